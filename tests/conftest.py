"""Shared fixtures: a tiny random Llama, the byte-level tokenizer, and small preference files."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from transformers import ByT5Tokenizer  # noqa: E402

from lightning_pref.data.synthetic import generate  # noqa: E402
from lightning_pref.models import load_causal_lm  # noqa: E402
from tests.support import TINY, write_jsonl  # noqa: E402


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Tokenization and reference caches go to a per-session temporary folder, never to ~/.cache."""
    monkeypatch.setenv("LIGHTNING_PREF_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(autouse=True)
def _only_builtin_plugins(monkeypatch):
    """Tests see the built-in plugins only, whatever plugins happen to be installed in the environment."""
    import importlib.metadata

    from lightning_pref import registry

    registries = registry.REGISTRIES
    groups = {r.group for r in registries}
    real = importlib.metadata.entry_points
    monkeypatch.setattr(
        importlib.metadata, "entry_points", lambda **kw: [] if kw.get("group") in groups else real(**kw)
    )
    for r in registries:
        monkeypatch.setattr(r, "plugins_loaded", False)


@pytest.fixture
def tokenizer() -> ByT5Tokenizer:
    return ByT5Tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    return load_causal_lm(TINY, field="test", seed=0, vocab_size=len(tokenizer))


@pytest.fixture
def pairs_file(tmp_path: Path) -> Path:
    records, _ = generate(24, seed=3)
    return write_jsonl(tmp_path / "pairs.jsonl", records)


@pytest.fixture(scope="session")
def smollm2():
    """Path of SmolLM2-135M-Instruct as a plain bf16 Hugging Face directory (see ``tests/real.py``)."""
    from tests.real import smollm2_dir

    return smollm2_dir()
