"""``reference_mode: precomputed``'s tables: reference log-probs of a split computed once and cached on disk.

:class:`~lightning_pref.reference.PrecomputedReference` (the mode) loads each split's table with
:func:`load_or_compute` before a stage runs, and attaches each batch's rows' values to it.

The cache key covers what decides the numbers:

- the tokenized data: a hash of the split's token ids (tokenizer and truncation settings included);
- the reference's *content*: for a local directory a hash of its weight and config files' bytes (remembered per
  file by size and modification time, so an unchanged directory is not read again, and a model retrained into
  the same directory is a miss); for a hub id the resolved commit; for a config dict its fields and seed;
- the dtype the reference is built in, its ``from_pretrained`` arguments, and the trainer's precision, since the
  table is scored inside the precision plugin's forward context (autocast), exactly as ``model`` mode scores.

On a miss the reference model is loaded, every process scores a strided share of the examples, the shares are
summed across processes so each holds the full table, the model is released, and process 0 writes the table
atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import torch
from lightning.pytorch import Trainer
from rich.progress import Progress

from lightning_pref.data.cache import default_dir
from lightning_pref.errors import UserInputError
from lightning_pref.layout import pad
from lightning_pref.logps import SequenceScorer

VERSION = 2
#: Files of a model directory whose bytes decide its outputs.
_CONTENT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "config.json", "*.index.json")


def data_fingerprint(table: datasets.Dataset) -> str:
    """Hash of a tokenized split's Arrow buffers (token ids, labels)."""
    digest = hashlib.sha256()
    for column in table.data.table.columns:
        for chunk in column.chunks:
            for buffer in chunk.buffers():
                if buffer is not None:
                    digest.update(memoryview(buffer))
    return digest.hexdigest()


def file_digest(path: Path, memo: dict[str, Any]) -> str:
    """sha256 of a file's bytes, remembered in ``memo`` under its path with its size and mtime."""
    stat = path.stat()
    key, seen = str(path.resolve()), memo.get(str(path.resolve()))
    if seen is not None and seen[:2] == [stat.st_size, stat.st_mtime_ns]:
        return seen[2]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    memo[key] = [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]
    return digest.hexdigest()


def weights_fingerprint(spec: str | dict, model_kwargs: dict[str, Any] | None, seed: int) -> str:
    """What the reference's weights are, by content: see the module docstring."""
    if not isinstance(spec, str):
        return json.dumps({"config": spec, "seed": seed}, sort_keys=True, default=str)
    directory = Path(spec)
    if directory.is_dir():
        memo_path = default_dir() / "file_digests.json"
        memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}
        files = sorted({f for pattern in _CONTENT_FILES for f in directory.glob(pattern)})
        if not files:
            raise UserInputError(f"model.reference: {spec} holds no model weights (*.safetensors, *.bin)")
        digest = hashlib.sha256()
        for f in files:
            digest.update(f"{f.name}:{file_digest(f, memo)}".encode())
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_path)
        return digest.hexdigest()
    from transformers import AutoConfig

    hub = {k: v for k, v in (model_kwargs or {}).items() if k in ("revision", "subfolder", "trust_remote_code")}
    commit = getattr(AutoConfig.from_pretrained(spec, **hub), "_commit_hash", None)
    if commit is None:
        raise UserInputError(f"model.reference: cannot resolve the revision of {spec!r} to key its cached log-probs")
    return f"{spec}@{commit}"


def cache_path(cache_dir: str | None, table: datasets.Dataset, reference_identity: dict) -> Path:
    key = json.dumps({"data": data_fingerprint(table), "reference": reference_identity, "v": VERSION},
                     sort_keys=True, default=str)
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
    with trainer.precision_plugin.forward_context():  # the autocast model mode's reference forward runs under
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
