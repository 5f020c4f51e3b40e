"""``reference_mode: precomputed``: reference log-probs computed once, cached on disk, looked up per batch.

The cache key covers the tokenized data (a hash of its token ids, so tokenizer and truncation settings are
included), the reference model's identity (spec, seed, dtype) and a format version. On a miss the reference
model is loaded, every process scores a strided share of the examples, the shares are summed across processes
so each holds the full table, the model is released, and process 0 writes the table atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import datasets
import torch
from lightning.pytorch import Trainer
from rich.progress import Progress

from lightning_pref.data.cache import default_dir
from lightning_pref.data.collate import pad
from lightning_pref.errors import UserInputError
from lightning_pref.logps import SequenceScorer

VERSION = 1


def data_fingerprint(table: datasets.Dataset) -> str:
    """Hash of a tokenized split's Arrow buffers (token ids, labels)."""
    digest = hashlib.sha256()
    for column in table.data.table.columns:
        for chunk in column.chunks:
            for buffer in chunk.buffers():
                if buffer is not None:
                    digest.update(memoryview(buffer))
    return digest.hexdigest()


def cache_path(cache_dir: str | None, table: datasets.Dataset, reference_identity: dict) -> Path:
    key = json.dumps({"data": data_fingerprint(table), "reference": reference_identity, "v": VERSION}, sort_keys=True)
    root = Path(cache_dir) if cache_dir else default_dir() / "reference_logps"
    return root / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"


@torch.no_grad()
def score_examples(scorer: SequenceScorer, dataset, pad_token_id: int, batch_size: int, rank: int, world: int,
                   device: torch.device, label: str) -> torch.Tensor:
    """Reference log-probs of this process's share of ``dataset``: ``(n, 2)``, zeros outside the share."""
    table = torch.zeros(len(dataset), 2)
    mine = list(range(rank, len(dataset), world))
    with Progress(disable=rank != 0, transient=True) as progress:
        task = progress.add_task(f"reference log-probs ({label})", total=len(mine))
        for start in range(0, len(mine), batch_size):
            sequences, cells = [], []
            for i in mine[start : start + batch_size]:
                example = dataset[i]
                sequences.append((example.prompt, example.chosen))
                cells.append((i, 0))
                if example.rejected is not None:
                    sequences.append((example.prompt, example.rejected))
                    cells.append((i, 1))
            ids, attention, response = (t.to(device) for t in pad(sequences, pad_token_id))
            logps, _, _ = scorer(ids, attention, response)
            rows, columns = zip(*cells, strict=True)
            table[list(rows), list(columns)] = logps.float().cpu()
            progress.advance(task, len(mine[start : start + batch_size]))
    return table


def load_or_compute(
    trainer: Trainer, dataset, reference_identity: dict, cache_dir: str | None, build_scorer: Callable[[], SequenceScorer],
    pad_token_id: int, batch_size: int, label: str,
) -> torch.Tensor:
    """The split's ``(n, 2)`` reference table, from the cache or computed (``build_scorer`` only on a miss)."""
    strategy = trainer.strategy
    path = cache_path(cache_dir, dataset.table, reference_identity)
    if strategy.broadcast(path.is_file()):  # one decision for all processes
        return torch.load(path, map_location="cpu")
    scorer = build_scorer()
    table = score_examples(scorer, dataset, pad_token_id, batch_size, trainer.global_rank, trainer.world_size,
                           strategy.root_device, label)
    del scorer
    table = strategy.reduce(table.to(strategy.root_device), reduce_op="sum").cpu()
    if trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(table, tmp)
        os.replace(tmp, path)  # atomic: a killed run never leaves a half-written cache entry
    strategy.barrier()
    return table


def attach_reference_logps(module) -> None:
    """Give ``module``'s data module reference log-probs for every split it holds (``precomputed`` mode only).

    Args:
        module: the :class:`~lightning_pref.module.PreferenceModule`, attached to a trainer.
    """
    hp = module.hparams
    if hp.reference_mode != "precomputed" or not module.loss.requires_reference:
        return
    datamodule = module.trainer.datamodule
    if not hasattr(datamodule, "reference_logps"):
        raise UserInputError("model.reference_mode: 'precomputed' needs data from a PreferenceDataModule")
    spec = hp.reference if hp.reference is not None else hp.policy
    identity = {"spec": spec, "seed": hp.init_seed, "dtype": hp.reference_dtype}

    def build_scorer() -> SequenceScorer:
        kwargs = module.reference_model_kwargs if hp.reference is not None else hp.model_kwargs
        reference = module.load_model(spec, "model.reference", module.reference_torch_dtype, kwargs)
        return module.scorer(reference.to(module.device).eval())

    for split, dataset in datamodule.datasets.items():
        if split not in datamodule.reference_logps:
            datamodule.reference_logps[split] = load_or_compute(
                module.trainer, dataset, identity, hp.reference_cache_dir, build_scorer,
                module.tokenizer.pad_token_id, datamodule.hparams.batch_size, split,
            )
