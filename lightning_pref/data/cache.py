"""On-disk cache of tokenized splits, keyed by a fingerprint of everything that shapes the token ids.

A cached split is an Arrow dataset written with ``save_to_disk`` and read back memory-mapped, so a second run
(or every DDP process after the first) neither re-tokenizes nor holds the split in RAM. The key covers the
source's content fingerprint, the row selection, the tokenizer (vocabulary, special tokens, chat template) and
the data options; change any of them and the split is tokenized again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from lightning_pref.data.stats import SplitStats

#: Bump when the encoding changes, so old entries are never read.
VERSION = 3  # 2: a chat response ends at the template's end-of-turn; prompts keep their head. 3: margin
_IDS = datasets.List(datasets.Value("int32"))
FEATURES = datasets.Features(
    {"prompt": _IDS, "chosen": _IDS, "rejected": _IDS, "label": datasets.Value("bool"), "length": datasets.Value("int32"),
     "margin": datasets.Value("float32")}
)


def default_dir() -> Path:
    """``$LIGHTNING_PREF_CACHE``, else ``$XDG_CACHE_HOME/lightning_pref`` (``~/.cache/lightning_pref``)."""
    root = os.environ.get("LIGHTNING_PREF_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lightning_pref"


def fingerprint(*parts: Any) -> str:
    """A short stable hash of ``parts`` (anything with a deterministic ``repr``)."""
    return hashlib.sha256(repr((VERSION, *parts)).encode()).hexdigest()[:24]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of what decides token ids: the vocabulary/merges, special tokens, BOS handling, chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return fingerprint(
        type(tokenizer).__name__,
        hashlib.sha256(vocab.encode()).hexdigest(),
        sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items()),
        tokenizer("x")["input_ids"],
        getattr(tokenizer, "chat_template", None),
    )


def to_dataset(columns: dict[str, list]) -> datasets.Dataset:
    """Encoded columns (``prompt``, ``chosen``, ``rejected``, ``label``, ``length``) as an in-memory dataset."""
    return datasets.Dataset.from_dict(columns, features=FEATURES)


def load(directory: Path, key: str) -> tuple[datasets.Dataset, SplitStats] | None:
    """The cached split and its stats, or ``None`` on a miss."""
    entry = directory / key
    if not (entry / "stats.json").is_file():
        return None
    stats = SplitStats(**json.loads((entry / "stats.json").read_text()))
    return datasets.load_from_disk(str(entry / "data")), stats


def store(directory: Path, key: str, dataset: datasets.Dataset, stats: SplitStats) -> datasets.Dataset:
    """Write a split and return it re-read from disk (memory-mapped)."""
    directory.mkdir(parents=True, exist_ok=True)
    entry = directory / key
    # Written under a temporary name and renamed, so a crashed run or a concurrent process never leaves a
    # half-written entry that a later run would read.
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=f".{key}-"))
    bars = not datasets.utils.are_progress_bars_disabled()  # our own cache write: no "Saving the dataset" bar
    datasets.utils.disable_progress_bars()
    try:
        dataset.save_to_disk(str(tmp / "data"))
    finally:
        if bars:
            datasets.utils.enable_progress_bars()
    (tmp / "stats.json").write_text(json.dumps(asdict(stats)))
    try:
        os.replace(tmp, entry)
    except OSError:  # another process stored the same entry first; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(entry / "data"))
