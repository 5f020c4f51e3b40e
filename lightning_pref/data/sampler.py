"""Length-grouped batching: batches of similar lengths cut padding, while the order stays random."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


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
