"""Shared fixtures: a tiny random Llama, the byte-level tokenizer, and small preference files."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from transformers import ByT5Tokenizer  # noqa: E402

from lightning_pref.data.synthetic import generate  # noqa: E402
from lightning_pref.models import load_causal_lm  # noqa: E402

TINY = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Tokenization and reference caches go to a per-session temporary folder, never to ~/.cache."""
    monkeypatch.setenv("LIGHTNING_PREF_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(autouse=True)
def _only_builtin_plugins(monkeypatch):
    """Tests see the built-in plugins only, whatever plugins happen to be installed in the environment."""
    import importlib.metadata

    from lightning_pref import registry

    registries = (registry.LOSSES, registry.REWARD_LOSSES, registry.JUDGES)
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
