"""Length-grouped batching: batches of similar lengths cut padding, while the order stays random."""

from __future__ import annotations

from collections.abc import Iterator, Sequence, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from lightning_pref.errors import UserInputError


class LengthGroupedSampler(Sampler[int]):
    """Shuffled indices in which each run of ``batch_size`` indices has similar lengths.

    Each epoch: shuffle all indices, cut them into groups of ``group_batches`` batches, sort each group by
    length and cut it into batches, then shuffle the batches. The batch holding the longest example goes first so
    that running out of memory shows at step 0, and a final partial batch stays last so every batch the
    DataLoader cuts from this order lines up with one built here. The order depends only on ``seed`` and the
    epoch (set by Lightning through :meth:`set_epoch`), so a resumed run sees the same batches.

    Args:
        lengths: token length of each example.
        batch_size: examples per batch, times the number of processes under DDP (Lightning hands every
            process one index in turn, so a batch of each process is drawn from one such block).
        seed: base seed.
        group_batches: batches per sorted group: larger cuts more padding, smaller keeps batches more random.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, group_batches: int = 50) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_batches = group_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        size = self.batch_size * self.group_batches
        batches = []
        for start in range(0, len(order), size):
            group = sorted(order[start : start + size], key=self.lengths.__getitem__, reverse=True)
            batches += [group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size)]
        # Only the very last group can end in a partial batch: keep it out of the shuffle, at the end.
        tail = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()] + tail
        if batches:
            longest = max(range(len(batches)), key=lambda b: max(self.lengths[i] for i in batches[b]))
            if not tail or longest != len(batches) - 1:
                batches.insert(0, batches.pop(longest))
        return iter([i for batch in batches for i in batch])


class TrainSampler(DistributedSampler):
    """The training order: seeded per epoch, split across processes, and resumable in the middle of an epoch.

    Each epoch's global order is a seeded permutation (or the order of ``grouped``, a
    :class:`LengthGroupedSampler`), padded by repetition to a multiple of the number of processes, of which
    process ``rank`` takes every ``num_replicas``-th index. Being a ``DistributedSampler``, Lightning uses it
    as is instead of replacing it. Its position in the epoch (samples trained on, counted by
    :class:`ResumableLoader` as batches are handed out) is its :meth:`state_dict`; restored, the next iteration of
    that epoch skips them, so a resumed run sees exactly the batches the uninterrupted run would have.
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        grouped: LengthGroupedSampler | None = None,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.grouped = grouped
        self.consumed = 0  # samples of the current epoch handed out in batches
        self._resume: tuple[int, int] | None = None  # (epoch, samples) to skip, from a checkpoint

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self.grouped is not None:
            self.grouped.set_epoch(epoch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "samples": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (state["epoch"], state["samples"])

    def __iter__(self) -> Iterator[int]:
        if self.grouped is not None:
            order = list(self.grouped)
        else:
            order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch))
            order = order.tolist()
        order += order[: self.total_size - len(order)]
        skip = self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0
        self._resume, self.consumed = None, skip
        return iter(order[self.rank : self.total_size : self.num_replicas][skip:])


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over a :class:`TrainSampler` whose position is part of Lightning's own loop state.

    Lightning saves the ``state_dict`` of a loader that has one with the fit loop and restores it on resume (and
    then does not warn that the loader is not resumable). Lightning does not prefetch from a loader of known
    length, so the batches handed out are exactly those trained on.
    """

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            self.sampler.consumed += self.batch_size
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {**self.sampler.state_dict(), "batch_size": self.batch_size, "processes": self.sampler.num_replicas,
                "examples": len(self.sampler.dataset)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the position in the epoch; refused in the middle of an epoch when the batches would not be those
        the interrupted run counted (Lightning restores its loop's batch count, which then spans other examples)."""
        if "batch_size" in state:  # earlier checkpoints did not record the batches
            was = (state["batch_size"], state["processes"], state["examples"])
            now = (self.batch_size, self.sampler.num_replicas, len(self.sampler.dataset))
            per_process = -(-was[2] // was[1])  # an epoch's examples per process (padded by repetition)
            if 0 < state["samples"] < per_process and was != now:
                raise UserInputError(
                    f"--ckpt_path: the checkpoint stopped in the middle of an epoch, after {state['samples']} examples "
                    f"per process in batches of {was[0]} on {was[1]} process(es) over {was[2]} training examples; "
                    f"this run has batches of {now[0]} on {now[1]} over {now[2]}, so the rest of that epoch would "
                    "skip or repeat examples: resume with the same data.train, data.batch_size and number of "
                    "devices, or from a checkpoint at an epoch's end"
                )
        self.sampler.load_state_dict(state)


class EvalSampler(DistributedSampler):
    """Evaluation order that marks the duplicates a distributed sampler pads in.

    Like ``DistributedSampler`` (no shuffle) every process gets the same number of samples, so collective calls
    per batch stay matched, but each index comes as ``(index, is_padding)``: the dataset gives padded duplicates
    weight 0, and epoch metrics over several processes equal the single-process values exactly.
    """

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)

    def __iter__(self) -> Iterator[tuple[int, bool]]:  # type: ignore[override]
        n = len(self.dataset)
        return iter((p % n, p >= n) for p in range(self.rank, self.total_size, self.num_replicas))
