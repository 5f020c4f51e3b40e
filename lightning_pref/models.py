"""Loading the policy, reference and tokenizer.

A model is given as a Hugging Face hub id or local directory (loaded with ``from_pretrained``), or as a dict
of ``transformers`` config fields (``{"model_type": "llama", "hidden_size": 64, ...}``) for a randomly
initialized model: that is how the embedded default and the tests run without any download.

Parameter dtypes follow Lightning's precision convention, not the checkpoint's storage dtype (transformers 5
loads ``dtype="auto"``, so a bf16 checkpoint would otherwise train bf16 parameters under ``32-true``):
``32-true`` and every ``*-mixed`` precision give fp32 master weights, ``bf16-true``/``16-true`` that dtype.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import torch
import transformers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lightning_pref.byte_tokenizer import byte_tokenizer
from lightning_pref.errors import UserInputError

ModelSpec = str | dict[str, Any]
DtypeName = Literal["float32", "bfloat16", "float16"]
# Which decoder layers an integer n of activation checkpointing recomputes (Megatron-LM's recompute methods):
# every n-th from the first, or the bottom n.
CheckpointMethod = Literal["uniform", "block"]

#: ``from_pretrained`` options that also select which config and tokenizer files are read.
_TOKENIZER_KWARGS = ("revision", "trust_remote_code", "subfolder", "cache_dir", "token")
_TRUE_PRECISIONS = {"64": torch.float64, "32": torch.float32, "bf16": torch.bfloat16, "16": torch.float16}

#: Tokenizer name that builds a byte-level tokenizer needing no files (:mod:`lightning_pref.byte_tokenizer`).
BYTE_TOKENIZER = "byte"


def parameter_dtype(precision: str | None, override: DtypeName | None = None) -> torch.dtype:
    """The parameter dtype for a Lightning ``precision`` (``"32-true"``, ``"bf16-mixed"``, ...).

    ``*-true`` precisions train parameters of that dtype; mixed precisions (and anything else, e.g.
    transformer-engine) keep fp32 master weights and let autocast pick the compute dtype. ``override``
    (``model.dtype``) wins.
    """
    if override is not None:
        return getattr(torch, override)
    head, _, kind = str(precision or "32-true").partition("-")
    return _TRUE_PRECISIONS.get(head, torch.float32) if kind == "true" else torch.float32


def load_causal_lm(
    spec: ModelSpec,
    *,
    field: str,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    model_kwargs: dict[str, Any] | None = None,
    auto_class: Any = AutoModelForCausalLM,
    num_labels: int | None = None,
    **config_overrides: Any,
) -> PreTrainedModel:
    """Build a causal LM (or, with ``auto_class``, another head on the same body, e.g.
    ``AutoModelForSequenceClassification`` for a reward model) from a hub id / local directory or from config
    fields.

    Args:
        spec: hub id or local path, or a dict of config fields (``model_type`` required) for random init.
        field: config field the spec came from, named in error messages (e.g. ``model.policy``).
        seed: seed of the random initialization, so the same spec always gives the same weights (the
            reference of a randomly initialized policy is rebuilt from it when a checkpoint is reloaded).
        dtype: parameter dtype; ``None`` keeps the checkpoint's / default dtype.
        model_kwargs: more ``from_pretrained`` (or ``from_config``) arguments, e.g. ``attn_implementation``,
            ``revision``; ``trust_remote_code`` stays off unless given here.
        auto_class: the ``transformers`` auto class that builds the model.
        num_labels: the outputs of a sequence-classification head, from a path and a dict alike (a pretrained
            config keeps its own, e.g. two labels, unless told).
        config_overrides: config fields filled in when the dict spec does not set them (e.g. ``vocab_size``).
    """
    kwargs = {"trust_remote_code": False, **(model_kwargs or {})}
    head = {} if num_labels is None else {"num_labels": num_labels}
    if isinstance(spec, str):
        try:
            return auto_class.from_pretrained(spec, dtype=dtype, **{**kwargs, **head})
        except OSError as err:
            raise UserInputError(
                f"{field}: cannot load {spec!r}: not a local model directory and not available "
                f"from the Hugging Face hub ({str(err).splitlines()[0]}). Give a path to a directory written by "
                "save_pretrained, a hub id, or a dict of config fields."
            ) from None
        except (TypeError, ValueError) as err:  # e.g. an unknown model_kwargs key, or remote code not trusted
            raise UserInputError(f"{field}: cannot load {spec!r}: {str(err).splitlines()[0]}") from None
        except RuntimeError as err:  # a saved head of another shape than the one asked for
            if num_labels is None or "ignore_mismatched_sizes" not in str(err):
                raise
            raise UserInputError(f"{field}: {spec} holds a classification head with another number of labels than "
                                 f"the {num_labels} needed here; start from its causal LM (the body without that head) "
                                 f"or a {num_labels}-label model") from None
    fields = dict(spec)
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise UserInputError(f"{field}: a config dict needs 'model_type' (e.g. llama, gpt2); got {sorted(spec)}")
    for key, value in {**config_overrides, **head}.items():
        fields.setdefault(key, value)
    config = AutoConfig.for_model(model_type, **fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = auto_class.from_config(config, **kwargs)
        except (TypeError, ValueError) as err:
            raise UserInputError(f"{field}: cannot build a {model_type} model: {str(err).splitlines()[0]}") from None
    return model.to(dtype) if dtype is not None else model


def load_reward_model(path: str, field: str, *, dtype: torch.dtype | None = None,
                      model_kwargs: dict[str, Any] | None = None) -> PreTrainedModel:
    """A trained reward model: a one-label ``AutoModelForSequenceClassification`` whose head was in the checkpoint
    (what ``lightning-pref export`` writes from a ``RewardModule`` checkpoint).

    ``from_pretrained`` would load a causal LM (or a classifier of several labels) here too, with a freshly
    initialized random head, and the scores would be noise: such a directory is refused instead, naming what it is.

    Args:
        path: a local directory or hub id.
        field: the option that gave it (``judge.path``, ``model.critic.model``), in messages.
        dtype: parameter dtype; ``None`` keeps the checkpoint's.
        model_kwargs: more ``from_pretrained`` arguments.

    Raises:
        UserInputError: the path does not load, or is not a one-label sequence-classification model with its head.
    """
    from transformers import AutoModelForSequenceClassification

    kwargs = {"trust_remote_code": False, **(model_kwargs or {})}
    file_kwargs = {k: v for k, v in kwargs.items() if k in _TOKENIZER_KWARGS}
    expected = ("expected a reward model: a one-label sequence-classification model with a trained head, e.g. a "
                "directory written by lightning-pref export from a RewardModule checkpoint")
    try:
        config = AutoConfig.from_pretrained(path, **file_kwargs)
    except (OSError, ValueError) as err:
        raise UserInputError(f"{field}: cannot load a model from {path!r} ({str(err).splitlines()[0]}); "
                             f"{expected}") from None
    kind = ", ".join(getattr(config, "architectures", None) or [config.model_type])
    if not any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or []):
        raise UserInputError(f"{field}: {path} is a {kind} model, not a reward model (its head would be new and "
                             f"random); {expected}")
    if config.num_labels != 1:
        raise UserInputError(f"{field}: {path} is a {kind} with {config.num_labels} labels; {expected}")
    model, info = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, output_loading_info=True,
                                                                     **kwargs)
    head = next((n for n in ("score", "classifier") if isinstance(getattr(model, n, None), nn.Module)), None)
    missing = [k for k in info.get("missing_keys", ()) if head is not None and k.startswith(f"{head}.")]
    if missing:
        raise UserInputError(f"{field}: {path} has no trained reward head ({missing[0]} is not in its weights, so it "
                             f"would be random); {expected}")
    return model


def load_configured(
    spec: ModelSpec, field: str, tokenizer: PreTrainedTokenizerBase, *, seed: int = 0, dtype: torch.dtype | None = None,
    model_kwargs: dict[str, Any] | None = None, dropout: bool = False, auto_class: Any = AutoModelForCausalLM,
    **fields: Any,
) -> PreTrainedModel:
    """:func:`load_causal_lm` as a lightning-pref module loads its models: a config dict gets the tokenizer's
    vocabulary size and its pad, EOS and BOS ids (so a random model stops, and its export reloads, as its
    tokenizer says), and dropout is turned off unless ``dropout``."""
    fields = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id, **fields}
    model = load_causal_lm(spec, field=field, seed=seed, dtype=dtype, model_kwargs=model_kwargs,
                           auto_class=auto_class, **fields)
    if not dropout:
        disable_dropout(model)
    return model


def model_tokenizer(spec: ModelSpec, tokenizer: str | None, model_kwargs: dict[str, Any] | None,
                    field: str) -> PreTrainedTokenizerBase:
    """The tokenizer a module trains ``spec`` with: ``tokenizer`` when given, else the model's own (from the same
    revision: the file-selecting ``model_kwargs`` are passed on)."""
    if tokenizer is None and not isinstance(spec, str):
        raise UserInputError(f"model.tokenizer: required when {field} is a config dict (e.g. 'byte')")
    own = tokenizer is None
    if own:  # the model's own: the field the user gave is the model's, and model.tokenizer is the way out
        return load_tokenizer(spec, field=f"model.tokenizer (null: {field}'s own)", model_kwargs=model_kwargs)
    return load_tokenizer(tokenizer)


def storage_dtype(spec: ModelSpec, model_kwargs: dict[str, Any] | None = None) -> str:
    """The dtype ``spec``'s checkpoint is stored in (its config's ``dtype``), for the start-up message;
    ``"random init"`` for a config dict. Read from the config file, since loading rewrites the config's dtype."""
    if not isinstance(spec, str):
        return "random init"
    kwargs = {k: v for k, v in (model_kwargs or {}).items() if k in _TOKENIZER_KWARGS}
    try:
        config = AutoConfig.from_pretrained(spec, **kwargs)
    except (OSError, ValueError):
        return "unknown"
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else "unknown"


def disable_dropout(model: nn.Module) -> None:
    """Turn off every dropout of ``model``: ``nn.Dropout`` modules and the float dropout rates attention layers
    read when training (``attention_dropout`` in Llama-style attention), as TRL does for DPO, so policy and
    reference agree at step 0. The config is left alone: an exported model keeps its own dropout settings."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


@contextlib.contextmanager
def quiet_saving() -> Iterator[None]:
    """No progress bars from ``save_pretrained`` ("Writing model shards") while lightning-pref writes a model:
    our own write of a small directory, not a download the user waits for."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def enable_activation_checkpointing(model: PreTrainedModel, layers: int = 1,
                                    method: CheckpointMethod = "uniform",
                                    field: str = "model.gradient_checkpointing") -> None:
    """Recompute decoder-layer activations in backward, non-reentrant; the other layers keep theirs, trading
    memory back for time. ``uniform``: every ``layers``-th layer's, from the first (transformers'
    ``every_n_layers``); ``block``: the bottom ``layers`` layers' (Megatron-LM's block method), so the layers
    that keep their activations are the top ones, whose backward runs first and frees them first, while the
    gradients grow.

    The top decoder layer always keeps its activations. Its backward runs first, right after the head's, so a
    checkpoint of it frees them only while the loss and the head's backward run (a preference step scores its
    reference before the policy), after which backward rebuilds them. Its recompute (1/L of a forward) lowers the
    step's peak only if that stretch holds it, which no measured run's did (SmolLM2 on HH rows, short and full:
    the same peak of allocated bytes with and without it, at the end of backward).

    Raises:
        UserInputError: ``uniform`` with ``layers > 1`` and a transformers that cannot leave layers out, or
            ``block`` on a model that does not name its decoder layers (``field`` names the option).
    """
    kwargs = {"use_reentrant": False}
    # transformers >= 5.x names it activation_checkpointing_enable (gradient_checkpointing_enable warns)
    enable = getattr(model, "activation_checkpointing_enable", None)
    name = "activation_checkpointing_kwargs" if enable is not None else "gradient_checkpointing_kwargs"
    enable = enable or model.gradient_checkpointing_enable
    decoder = decoder_layers(model)
    if method == "block" and decoder is None:
        raise UserInputError(f"{field}_method: block recomputes the bottom {layers} decoder layers, and "
                             f"{type(model).__name__} does not name its decoder layers "
                             "(get_decoder().layers); set it to uniform")
    if layers == 1 or method == "block":
        enable(**{name: kwargs})
    elif "every_n_layers" not in inspect.signature(enable).parameters:
        raise UserInputError(f"{field}: {layers} (recompute one decoder layer in {layers}) needs "
                             f"transformers' every_n_layers, which {enable.__name__} of transformers "
                             f"{transformers.__version__} does not take; upgrade transformers, or set it to true "
                             "(every layer)")
    else:
        enable(**{name: kwargs}, every_n_layers=layers)
    if decoder is None:
        return
    top = len(decoder) - 1
    for layer in decoder[min(layers, top) if method == "block" else top:]:  # these keep their activations
        # transformers' per-layer switch, which enable() has just set
        if getattr(layer, "gradient_checkpointing", False):
            layer.gradient_checkpointing = False


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The decoder's ``layers``, bottom first, where the model names its decoder (``get_decoder()``)."""
    decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    layers = getattr(decoder, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) and len(layers) else None


def read_tokenizer(name: str, field: str, fix: str, **kwargs: Any) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained(name)``; when it cannot be read, one line naming ``field``, why and ``fix``
    (transformers raises ``OSError`` for a path or hub id it cannot find, and ``ValueError``, whose message then
    breaks off at "from one of:", for a directory without tokenizer files)."""
    try:
        return AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        text = str(err).strip()
        why = ("no tokenizer files in it" if "backend tokenizer" in text
               else (text.splitlines() or [type(err).__name__])[0].rstrip(" :"))
        raise UserInputError(f"{field}: cannot load tokenizer {name!r} ({why}); {fix}") from None


def load_tokenizer(
    name: str, *, field: str = "model.tokenizer", model_kwargs: dict[str, Any] | None = None
) -> PreTrainedTokenizerBase:
    """Load a tokenizer by hub id or local path; ``"byte"`` builds a byte-level one that needs no files.

    A tokenizer without a pad token gets its EOS token as pad (padding is masked out everywhere, so the choice
    does not change any value), and a warning says so. ``model_kwargs`` that select files (``revision``,
    ``trust_remote_code``, ...) are passed on, so the policy's own tokenizer comes from the same revision.
    """
    if name == BYTE_TOKENIZER:
        tokenizer = byte_tokenizer()
    else:
        kwargs = {k: v for k, v in (model_kwargs or {}).items() if k in _TOKENIZER_KWARGS}
        tokenizer = read_tokenizer(name, field, "give a local directory with tokenizer files, a hub id, or "
                                   f"{BYTE_TOKENIZER!r} for a byte-level tokenizer that needs no files", **kwargs)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise UserInputError(f"{field}: tokenizer {name!r} has neither a pad nor an EOS token; set one.")
        tokenizer.pad_token = tokenizer.eos_token
        warnings.warn(
            f"tokenizer {name!r} has no pad token; using its EOS token {tokenizer.eos_token!r} as pad", stacklevel=2
        )
    return tokenizer
