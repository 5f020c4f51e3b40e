"""Padding-free batches: sequences laid end to end in rows (:class:`~lightning_pref.types.PackedRows`), in one
place: how rows are filled, which models can run them, how a scorer runs and reads them, and the way back to
padding.

- :func:`pack` (collate time): best-fit-decreasing into rows as long as the batch's longest sequence (or pair,
  with shared prompts), positions restarting at 0 for every sequence.
- :func:`supports_packing`, :func:`prompt_sharing_masks`: whether a model can take packed rows, and the masks it
  needs for shared prompts (``None`` where it cannot take them).
- :func:`body_inputs`, :func:`scored_tokens`: what the transformer body runs on, and which hidden state predicts
  each scored token and for which sequence, so per-sequence sums come back in the batch's row order.
- :func:`runnable`: what of a packed batch a model runs (with shared prompts, without, or padded again by
  :func:`unpack`), saying once why it falls back.

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
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_pref.types import PackedRows

Sequence = tuple[list[int], list[int]]  # (prompt ids, response ids)

#: ``data.packing``: ``false`` pads; ``true`` packs; ``shared`` also runs each pair's prompt once; ``auto`` (the
#: default) is what measured fastest: shared prompts for pairs, plain packing for unpaired examples. A model that
#: cannot take shared prompts gets plain packing, one that cannot take packed rows padding, with an info line.
Packing = bool | Literal["auto", "shared"]

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


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of total length at most ``capacity``: items longest first (ties by index), each into the fullest bin
    it fits. Deterministic. # [N] -> [R] lists of item indices, each in placement order"""
    bins: list[list[int]] = []
    space: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(bins)) if space[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (space[b], b))
        else:
            b = len(bins)
            bins.append([])
            space.append(capacity)
        bins[b].append(i)
        space[b] -= lengths[i]
    return bins


def shares_prompts(packing: Packing, paired: bool) -> bool:
    """Whether ``data.packing`` puts each pair's prompt once in a shared segment."""
    return paired and packing in ("shared", "auto")


def pack(sequences: list[Sequence], pad_token_id: int, share_prompts: bool = False) -> PackedRows:
    """Lay ``sequences`` (``(prompt, response)`` ids in batch row order) end to end in rows.

    Args:
        sequences: the batch's ``N`` sequences; with ``share_prompts`` a paired batch ``[chosen; rejected]``
            whose row ``i`` and ``N/2 + i`` have the same prompt.
        pad_token_id: id of the filler cells.
        share_prompts: one segment ``[prompt, chosen, rejected]`` per pair (see :class:`PackedRows`).
    """
    half = len(sequences) // 2
    if share_prompts:
        segments = [[(i, 0), (i, len(sequences[i][0])), (half + i, len(sequences[i][0]))] for i in range(half)]
    else:  # (sequence, token offset) parts: the prompt and response of each sequence
        segments = [[(n, 0)] for n in range(len(sequences))]
    parts = [_parts(sequences, segment, share_prompts) for segment in segments]
    lengths = [sum(len(ids) for ids, *_ in segment) for segment in parts]
    bins = best_fit_decreasing(lengths, max(lengths, default=0))
    shape = (len(bins), max(lengths, default=0))
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    response_mask = torch.zeros(shape, dtype=torch.bool)
    sequence_index = torch.full(shape, -1, dtype=torch.long)
    segment_index = torch.full(shape, -1, dtype=torch.long)  # for the shared-prompt mask only
    for row, members in enumerate(bins):
        column = 0
        for s in members:
            for ids, n, start, response in parts[s]:
                cells = slice(column, column + len(ids))
                input_ids[row, cells] = torch.tensor(ids, dtype=torch.long)
                position_ids[row, cells] = torch.arange(start, start + len(ids))
                response_mask[row, cells] = response
                sequence_index[row, cells] = n
                segment_index[row, cells] = s
                column += len(ids)
    packed = PackedRows(input_ids, position_ids, response_mask, sequence_index, len(sequences), pad_token_id,
                        shared_prompts=share_prompts)
    if share_prompts:
        packed.attention_mask = _shared_mask(segment_index, sequence_index, response_mask, half)
    return packed


def _parts(sequences: list[Sequence], segment: list[tuple[int, int]], share_prompts: bool) -> list[tuple]:
    """``(ids, sequence, first position, is response)`` of each part of a segment, in order."""
    if not share_prompts:
        (n, _), = segment
        prompt, response = sequences[n]
        return [(prompt, n, 0, False), (response, n, len(prompt), True)]
    (chosen, _), _, (rejected, offset) = segment
    prompt = sequences[chosen][0]
    return [(prompt, chosen, 0, False), (sequences[chosen][1], chosen, offset, True),
            (sequences[rejected][1], rejected, offset, True)]


def _shared_mask(segment: Tensor, sequence: Tensor, response: Tensor, half: int) -> Tensor:
    """Causal within each segment, except that rejected tokens do not see the chosen response. # -> (R, 1, L, L)"""
    length = segment.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()  # (L, L) query i sees key j <= i
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)  # (R, L, L)
    rejected = sequence >= half  # (R, L)
    chosen_response = response & (sequence >= 0) & ~rejected
    blind = rejected[:, :, None] & chosen_response[:, None, :]  # (R, L, L)
    allowed = same & causal & ~blind
    # A filler cell attends to itself: a query row that sees nothing would softmax to NaN.
    allowed |= torch.eye(length, dtype=torch.bool) & (segment < 0)[:, :, None]
    return allowed[:, None]


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


def prompt_sharing_masks(model: nn.Module, packed: PackedRows, dtype: torch.dtype) -> tuple[Any, str]:
    """The attention mask ``model``'s body takes for ``packed``'s shared prompts, or ``None`` and why not.

    sdpa takes the boolean mask (True where attended) as it is, eager attention adds it to the scores, so it gets
    an additive one in ``dtype`` (0 where attended, the dtype's minimum elsewhere). A 4D mask is used as given by every layer, sliding-window ones included, so a model with
    sliding-window layers gets a ``{layer type: mask}`` mapping with the window built in where its forward takes
    one; otherwise only batches whose segments fit in the window can share prompts.
    """
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    attention = getattr(config, "_attn_implementation", None)
    if attention not in _MASK_ATTENTION:
        return None, f"attention implementation {attention!r} takes no custom 4D mask (only {', '.join(_MASK_ATTENTION)})"
    allowed = packed.attention_mask  # (R, 1, L, L)
    window = getattr(text, "sliding_window", None)
    layer_types = set(getattr(text, "layer_types", None) or ())
    sliding = bool(window) and (layer_types == set() or "sliding_attention" in layer_types)
    if layer_types and "sliding_attention" not in layer_types:
        sliding = False
    form = (lambda m: m) if attention == "sdpa" else (lambda m: _additive(m, dtype))
    if not sliding or int(packed.position_ids.max()) < window:
        return form(allowed), ""
    body = getattr(model, "base_model", model)
    if not _takes_mask_mapping(type(body)):
        return None, f"{type(body).__name__} applies one custom mask to its sliding-window layers too"
    positions = packed.position_ids  # (R, L); within a segment, distance in positions = distance in its sequence
    near = (positions[:, :, None] - positions[:, None, :]) < window  # (R, L, L) query i, key j
    return {"full_attention": form(allowed), "sliding_attention": form(allowed & near[:, None])}, ""


@functools.cache
def _takes_mask_mapping(body: type) -> bool:
    return _MASK_MAPPING in inspect.getsource(body.forward)


def runnable(model: nn.Module, packed: PackedRows) -> tuple[PackedRows | None, Any]:
    """The layout of ``packed`` that ``model`` runs, and the attention masks it needs (``None``: none).

    Shared prompts where the model takes their masks, else plain packing; ``None`` for a model that cannot take
    packed rows at all (the caller pads the batch with :func:`unpack`). Each fallback is told once, on rank 0.
    """
    supported, why = supports_packing(model)
    if not supported:
        _tell(f"lightning-pref: data.packing: scoring padded batches, {why}")
        return None, None
    if not packed.shared_prompts:
        return packed, None
    masks, why = prompt_sharing_masks(model, packed, model.dtype)
    if masks is None:
        _tell(f"lightning-pref: data.packing: packing without shared prompts, {why}")
        return unshare(packed), None
    return packed, masks


@functools.cache
def _tell(message: str) -> None:
    rank_zero_info(message)


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def body_inputs(packed: PackedRows, masks: Any = None) -> dict[str, Any]:
    """Keyword arguments of the transformer body for ``packed`` (``masks``: from :func:`prompt_sharing_masks`).

    Without a cache and without a mask, so transformers finds the packed sequences from the positions.
    """
    inputs = {"input_ids": packed.input_ids, "position_ids": packed.position_ids, "use_cache": False}
    if masks is not None:
        inputs["attention_mask"] = masks
    return inputs


def scored_tokens(packed: PackedRows) -> tuple[Tensor, Tensor, Tensor]:
    """Which cells are scored, which cell's hidden state predicts each, and the sequence each belongs to.

    A response token is scored from the token before it in its own sequence, never from the end of the previous
    sequence in the row: a sequence's first token (position 0, an empty prompt's first response token) is not
    scored, as in a padded row. With shared prompts the rejected response's first token is predicted from the
    prompt's last token, not from the chosen response before it.

    Returns:
        ``(cells, predictors, sequences)``, flat indices into ``R * L`` and batch rows. # each (S,)
    """
    flat_sequence = packed.sequence_index.flatten()  # (R * L,)
    cells = (packed.response_mask & (packed.position_ids > 0)).flatten().nonzero().squeeze(-1)  # (S,)
    sequences = flat_sequence[cells]
    predictors = cells - 1
    if packed.shared_prompts:
        half = packed.num_sequences // 2
        first_rejected = flat_sequence[predictors] != sequences  # the cell before is the chosen's (or prompt's)
        responses = packed.response_mask.flatten() & (flat_sequence >= 0)
        chosen_lengths = torch.bincount(flat_sequence[responses], minlength=packed.num_sequences)  # (N,)
        skip = chosen_lengths[(sequences - half).clamp(min=0)]  # jump back over the chosen response
        predictors = torch.where(first_rejected, predictors - skip, predictors)
    return cells, predictors, sequences


def last_cells(packed: PackedRows) -> Tensor:
    """Flat index into ``R * L`` of each sequence's last token (a reward model reads it). # -> (N,)"""
    flat = packed.sequence_index.flatten()  # (R * L,)
    cells = torch.arange(flat.numel(), device=flat.device)
    real = flat >= 0
    last = torch.full((packed.num_sequences,), -1, dtype=torch.long, device=flat.device)
    return last.scatter_reduce(0, flat[real], cells[real], "amax")


def sequence_sums(values: Tensor, sequences: Tensor, num_sequences: int) -> Tensor:
    """Sum per-token ``values`` per batch row. # (S,), (S,) -> (N,)"""
    return values.new_zeros(num_sequences).index_add(0, sequences, values)


def unpacked_sequences(packed: PackedRows) -> list[Sequence]:
    """The ``(prompt, response)`` ids of each batch row again (a shared prompt given to both rows)."""
    ids, sequence, response = (t.flatten().tolist() for t in (packed.input_ids.cpu(), packed.sequence_index.cpu(),
                                                               packed.response_mask.cpu()))
    out: list[Sequence] = [([], []) for _ in range(packed.num_sequences)]
    for token, n, is_response in zip(ids, sequence, response, strict=True):
        if n >= 0:
            out[n][1 if is_response else 0].append(token)
    if packed.shared_prompts:
        half = packed.num_sequences // 2
        out[half:] = [(out[i][0], out[half + i][1]) for i in range(half)]
    return out


def unpack(packed: PackedRows) -> tuple[Tensor, Tensor, Tensor]:
    """The padded ``input_ids``, ``attention_mask`` and ``response_mask`` of the same batch, on its device.
    # each (N, T)"""
    from lightning_pref.data.collate import pad  # the batch's own padding

    return tuple(t.to(packed.input_ids.device) for t in pad(unpacked_sequences(packed), packed.pad_token_id))


def unshare(packed: PackedRows) -> PackedRows:
    """The same batch packed without shared prompts, on its device."""
    plain = pack(unpacked_sequences(packed), packed.pad_token_id)
    device = packed.input_ids.device
    return PackedRows(*(t.to(device) for t in (plain.input_ids, plain.position_ids, plain.response_mask,
                                                plain.sequence_index)), plain.num_sequences, plain.pad_token_id)
