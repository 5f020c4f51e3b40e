"""Loading the policy, reference and tokenizer.

A model is given as a Hugging Face hub id or local directory (loaded with ``from_pretrained``), or as a dict
of ``transformers`` config fields (``{"model_type": "llama", "hidden_size": 64, ...}``) for a randomly
initialized model: that is how the embedded default and the tests run without any download.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    ByT5Tokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lightning_pref.errors import UserInputError

ModelSpec = str | dict[str, Any]

#: Tokenizer name that builds a byte-level tokenizer needing no files (``transformers.ByT5Tokenizer``).
BYTE_TOKENIZER = "byte"


def load_causal_lm(
    spec: ModelSpec, *, field: str, seed: int = 0, dtype: torch.dtype | None = None, **config_overrides: Any
) -> PreTrainedModel:
    """Build a causal LM from a hub id / local directory or from config fields.

    Args:
        spec: hub id or local path, or a dict of config fields (``model_type`` required) for random init.
        field: config field the spec came from, named in error messages (e.g. ``model.policy``).
        seed: seed of the random initialization, so the same spec always gives the same weights (the
            reference of a randomly initialized policy is rebuilt from it when a checkpoint is reloaded).
        dtype: parameter dtype; ``None`` keeps the checkpoint's / default dtype.
        config_overrides: config fields filled in when the dict spec does not set them (e.g. ``vocab_size``).
    """
    if isinstance(spec, str):
        try:
            return AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
        except OSError as err:
            raise UserInputError(
                f"{field}: cannot load {spec!r} as a causal LM: not a local model directory and not available "
                f"from the Hugging Face hub ({str(err).splitlines()[0]}). Give a path to a directory written by "
                "save_pretrained, a hub id, or a dict of config fields."
            ) from None
    fields = dict(spec)
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise UserInputError(f"{field}: a config dict needs 'model_type' (e.g. llama, gpt2); got {sorted(spec)}")
    for key, value in config_overrides.items():
        fields.setdefault(key, value)
    config = AutoConfig.for_model(model_type, **fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype) if dtype is not None else model


def load_tokenizer(name: str, *, field: str = "model.tokenizer") -> PreTrainedTokenizerBase:
    """Load a tokenizer by hub id or local path; ``"byte"`` builds a byte-level one that needs no files.

    A tokenizer without a pad token gets its EOS token as pad (padding is masked out everywhere, so the choice
    does not change any value), and a warning says so.
    """
    if name == BYTE_TOKENIZER:
        tokenizer = ByT5Tokenizer()
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except OSError as err:
            raise UserInputError(
                f"{field}: cannot load tokenizer {name!r} ({str(err).splitlines()[0]}). Give a local directory, a "
                f"hub id, or {BYTE_TOKENIZER!r} for a byte-level tokenizer that needs no files."
            ) from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise UserInputError(f"{field}: tokenizer {name!r} has neither a pad nor an EOS token; set one.")
        tokenizer.pad_token = tokenizer.eos_token
        warnings.warn(
            f"tokenizer {name!r} has no pad token; using its EOS token {tokenizer.eos_token!r} as pad", stacklevel=2
        )
    return tokenizer
