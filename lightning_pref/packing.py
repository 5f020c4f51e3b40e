"""Which packed layouts a *model* can run (:mod:`lightning_pref.layout` builds them), and what it needs to.

- :func:`capability`: whether a model takes packed rows and shared-prompt masks, read once from its config and
  its forward's signature (scorers keep it, so nothing is inspected per batch).
- :func:`prompt_sharing_masks`: the attention masks a model's body takes for shared prompts (``None`` where it
  cannot take them), sliding-window layers included.
- :func:`runnable`: what of a packed batch a model runs (with shared prompts, without, or ``None``: pad it),
  saying once why it falls back.
- :func:`body_inputs`: the body's keyword arguments for a packed batch, with each row's segments for attention
  run per segment (:func:`segment_attention`).

Plain packing passes no attention mask: with ``position_ids`` given, no mask and no cache, transformers (4.56 and
later) derives each token's sequence from where the positions restart (``masking_utils.find_packed_sequence_indices``)
and builds block-causal masks, sliding-window ones included. ``use_cache=False`` is required: with a cache it
does not look for packed sequences. A 4D mask is used as given (``masking_utils._preprocess_mask_arguments``),
which shared prompts rely on.
"""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_pref.layout import segment_spans, unshare
from lightning_pref.segment_attention import PROMPTS, SEGMENTS, PromptKV, SegmentPlan
from lightning_pref.segment_attention import install as install_segment_attention
from lightning_pref.types import PackedRows

# Attention implementations whose masks transformers builds from packed position_ids (flash-attention from the
# sequence boundaries, flex from a block mask, sdpa and eager from a block-causal 4D mask).
_PACKING_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flex_attention")
# A custom (R, 1, L, L) mask is taken only by these (flash-attention has no dense mask, flex needs a BlockMask).
_MASK_ATTENTION = ("sdpa", "eager")
_ATTENTION_LAYERS = ("full_attention", "sliding_attention")
# Recurrent, state-space and linear-attention models: their state runs across the whole row, so a sequence
# would carry the previous one's state. Listed by model type where the config has no ``layer_types``.
_RECURRENT_MODEL_TYPES = frozenset({
    "bamba", "falcon_h1", "falcon_mamba", "granitemoehybrid", "jamba", "kimi_linear", "lfm2", "lfm2_moe", "mamba",
    "mamba2", "minimax", "nemotron_h", "plamo2", "qwen3_next", "recurrent_gemma", "rwkv", "xlstm", "zamba", "zamba2",
})
# Models whose forward takes a per-layer-type mask mapping (``{"full_attention": m, "sliding_attention": m'}``).
_MASK_MAPPING = "isinstance(causal_mask_mapping := attention_mask, dict)"


def supports_packing(model: nn.Module) -> tuple[bool, str]:
    """Whether ``model`` (a ``transformers`` causal LM or sequence classifier) scores packed rows exactly as
    padded ones, and if not why (for the fallback's one-line message)."""
    config = getattr(model, "config", None)
    body = getattr(model, "base_model", model)
    if config is None:
        return False, f"{type(model).__name__} has no transformers config"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if "position_ids" not in inspect.signature(type(body).forward).parameters:
        return False, f"{type(body).__name__}.forward takes no position_ids"
    module = sys.modules.get(type(body).__module__)
    # Packed sequences are found by transformers' shared mask creation; a model that builds its own masks
    # (remote code, some older architectures) would attend across sequences.
    if not type(body).__module__.startswith("transformers.") or not hasattr(module, "create_causal_mask"):
        return False, f"{type(body).__name__} does not build its masks with transformers.masking_utils"
    if text.model_type in _RECURRENT_MODEL_TYPES:
        return False, f"{text.model_type} has recurrent or state-space layers"
    other = sorted(set(getattr(text, "layer_types", None) or ()) - set(_ATTENTION_LAYERS))
    if other:
        return False, f"{text.model_type} has {', '.join(other)} layers"
    attention = getattr(config, "_attn_implementation", None)
    if attention not in _PACKING_ATTENTION:
        return False, f"attention implementation {attention!r} is not one of {', '.join(_PACKING_ATTENTION)}"
    return True, ""


@dataclass(frozen=True)
class Capability:
    """What packed layouts a model runs, decided once per model (its config and signature do not change).

    Attributes:
        packs: takes packed rows at all; ``why`` says why not.
        attention: its attention implementation (which form of custom mask it takes, if any).
        window: the sliding window of its sliding-window layers; ``None`` without such layers.
        mask_mapping: its forward takes a ``{layer type: mask}`` mapping (a window built into the sliding mask).
    """

    packs: bool
    why: str
    attention: str | None
    window: int | None
    mask_mapping: bool


def capability(model: nn.Module) -> Capability:
    """``model``'s :class:`Capability` (inspects its config and forward once)."""
    packs, why = supports_packing(model)
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    layer_types = set(getattr(text, "layer_types", None) or ())
    sliding = bool(window) and (not layer_types or "sliding_attention" in layer_types)
    body = getattr(model, "base_model", model)
    return Capability(packs, why, getattr(config, "_attn_implementation", None), window if sliding else None,
                      packs and _takes_mask_mapping(type(body)))


def prompt_sharing_masks(model: nn.Module, packed: PackedRows, dtype: torch.dtype,
                         can: Capability | None = None) -> tuple[Any, str]:
    """The attention mask ``model``'s body takes for ``packed``'s shared prompts, or ``None`` and why not.

    sdpa takes the boolean mask (True where attended) as it is, eager attention adds it to the scores, so it gets
    an additive one in ``dtype`` (0 where attended, the dtype's minimum elsewhere). A 4D mask is used as given by
    every layer, sliding-window ones included, so a model with sliding-window layers gets a ``{layer type: mask}``
    mapping with the window built in where its forward takes one; otherwise only batches whose segments fit in
    the window can share prompts.
    """
    can = can or capability(model)
    if can.attention not in _MASK_ATTENTION:
        return None, f"attention implementation {can.attention!r} takes no custom 4D mask (only {', '.join(_MASK_ATTENTION)})"
    allowed = packed.attention_mask  # (R, 1, L, L)
    form = (lambda m: m) if can.attention == "sdpa" else (lambda m: _additive(m, dtype))
    if can.window is None or int(packed.position_ids.max()) < can.window:
        return form(allowed), ""
    if not can.mask_mapping:
        body = getattr(model, "base_model", model)
        return None, f"{type(body).__name__} applies one custom mask to its sliding-window layers too"
    positions = packed.position_ids  # (R, L); within a segment, distance in positions = distance in its sequence
    near = (positions[:, :, None] - positions[:, None, :]) < can.window  # (R, L, L) query i, key j
    return {"full_attention": form(allowed), "sliding_attention": form(allowed & near[:, None])}, ""


@functools.cache
def _takes_mask_mapping(body: type) -> bool:
    try:
        return _MASK_MAPPING in inspect.getsource(body.forward)
    except (OSError, TypeError):  # no source (compiled or generated class): assume the plain mask
        return False


def runnable(model: nn.Module, packed: PackedRows, can: Capability | None = None) -> tuple[PackedRows | None, Any]:
    """The layout of ``packed`` that ``model`` runs, and the attention masks it needs (``None``: none).

    Shared prompts where the model takes their masks, else plain packing; ``None`` for a model that cannot take
    packed rows at all (the caller pads the batch, :func:`lightning_pref.layout.unpack`). Each fallback is told
    once, on rank 0.

    Args:
        model: the ``transformers`` model.
        packed: the batch's packed rows.
        can: ``model``'s :func:`capability`, as its scorer keeps it (computed here when not given).
    """
    can = can or capability(model)
    if not can.packs:
        _tell(f"lightning-pref: data.packing: scoring padded batches, {can.why}")
        return None, None
    if not packed.shared_prompts:
        return packed, None
    masks, why = prompt_sharing_masks(model, packed, model.dtype, can)
    if masks is None:
        _tell(f"lightning-pref: data.packing: packing without shared prompts, {why}")
        return unshare(packed), None
    return packed, masks


@functools.cache
def _tell(message: str) -> None:
    rank_zero_info(message)


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def body_inputs(packed: PackedRows, masks: Any = None, per_segment: bool = False,
                prompts: PromptKV | None = None) -> dict[str, Any]:
    """Keyword arguments of the transformer body for ``packed`` (``masks``: from :func:`prompt_sharing_masks`).

    Without a cache and without a mask, so transformers finds the packed sequences from the positions. With
    ``per_segment`` (an sdpa model, see :func:`segment_attention`) attention runs on each segment on its own,
    recording or continuing ``prompts``.
    """
    inputs = {"input_ids": packed.input_ids, "position_ids": packed.position_ids, "use_cache": False}
    if masks is not None:
        inputs["attention_mask"] = masks
    if per_segment:
        install_segment_attention()
        inputs[SEGMENTS] = SegmentPlan(segment_spans(packed))
        if prompts is not None:
            inputs[PROMPTS] = prompts
    return inputs


def segment_attention(can: Capability) -> bool:
    """Whether a model of capability ``can`` runs packed rows' attention per segment
    (:mod:`lightning_pref.segment_attention`): sdpa models that take packed rows."""
    return can.packs and can.attention == "sdpa"
