"""Attention over each segment of a packed row on its own: the work of the block-diagonal mask, not of the row.

A packed row of ``L`` cells holds segments of ``L_1, ..., L_k`` cells (a sequence, or a prompt with the responses
continuing it) that never attend to one another. Given the row's dense ``(L, L)`` mask, sdpa computes all
``L^2`` (query, key) pairs: the CPU kernels and the GPU ones that take a mask skip no block. Run on each segment
with its diagonal block of the mask, it computes ``sum L_i^2`` pairs and gives the same output: four HH pairs
(prompt, chosen, rejected) of about 96 cells in one row of 384 go from 147k to 37k pairs, and attention from 11%
of SmolLM2's DPO step (one row, no checkpointing) to about 3%.

transformers calls the function registered for the model's attention implementation with the keyword arguments
the model's forward received. :func:`install` registers, under ``"sdpa"``, a function that runs per segment when
it is given :data:`SEGMENTS` (the body's input from :func:`lightning_pref.packing.body_inputs`) and is
transformers' own sdpa, called as it is, otherwise: generation, padded batches, other code in the process. It
replaces a process-wide registration, hence once, on first use, and only around that function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_utils import AttentionInterface

#: The body's keyword argument: for each row, the ``(start, end)`` cells of each of its segments.
SEGMENTS = "attention_segments"

_sdpa: Callable[..., tuple[Tensor, Any]] | None = None  # transformers' sdpa, kept when install() replaces it


def install() -> None:
    """Register the per-segment sdpa (idempotent)."""
    global _sdpa
    if _sdpa is None:
        _sdpa = AttentionInterface._global_mapping["sdpa"]
        AttentionInterface.register("sdpa", segment_sdpa)


def segment_sdpa(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                 *args: Any, **kwargs: Any) -> tuple[Tensor, None]:
    """sdpa per segment where the body was given :data:`SEGMENTS`, transformers' sdpa otherwise.

    Args:
        module: the attention layer (GQA groups, causality).
        query: # (R, H, L, D)
        key, value: # (R, H_kv, L, D); a cache makes them longer than the queries: then the whole row runs.
        attention_mask: the row's mask, boolean or additive; the ``(start, end)`` block of a segment is its own.
            # (R or 1, 1, L, L)

    Returns:
        The attention output and no weights; cells outside every segment (filler) get zeros, which nothing reads.
        # (R, L, H, D)
    """
    assert _sdpa is not None, "segment_attention.install() registers this function"
    spans = kwargs.pop(SEGMENTS, None)
    if spans is None or attention_mask is None or attention_mask.dim() != 4 or key.shape[2] != query.shape[2]:
        return _sdpa(module, query, key, value, attention_mask, *args, **kwargs)
    length = query.shape[2]
    rows = []
    for r, row_spans in enumerate(spans):
        mask = attention_mask[r : r + 1] if attention_mask.shape[0] > 1 else attention_mask
        pieces, column = [], 0
        for start, end in row_spans:
            if start > column:  # filler before this segment
                pieces.append(query.new_zeros(1, start - column, query.shape[1], query.shape[3]))
            cells = slice(start, end)
            out, _ = _sdpa(module, query[r : r + 1, :, cells], key[r : r + 1, :, cells], value[r : r + 1, :, cells],
                           mask[:, :, cells, cells], *args, **kwargs)  # (1, end - start, H, D)
            pieces.append(out)
            column = end
        if column < length:
            pieces.append(query.new_zeros(1, length - column, query.shape[1], query.shape[3]))
        rows.append(torch.cat(pieces, 1))
    return torch.cat(rows, 0), None
