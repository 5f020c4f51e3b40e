"""Attention over each segment of a packed row on its own: the work of the block-diagonal mask, not of the row.

A packed row of ``L`` cells holds segments of ``L_1, ..., L_k`` cells (a sequence, or a prompt with the responses
continuing it) that never attend to one another. Given the row's dense ``(L, L)`` mask, sdpa computes all
``L^2`` (query, key) pairs: the CPU kernels and the GPU ones that take a mask skip no block. Run on each segment
with its diagonal block of the mask, it computes ``sum L_i^2`` pairs and gives the same output: four HH pairs
(prompt, chosen, rejected) of about 96 cells in one row of 384 go from 147k to 37k pairs, and attention from 11%
of SmolLM2's DPO step (one row, no checkpointing) to about 3%. Within a segment, a response that continues the
owner's prompt (a pair's rejected response) runs on the prompt's keys and its own, not on the whole segment's
with the chosen response masked out (:meth:`lightning_pref.layout.Segment.blocks`): a quarter fewer pairs for an
HH pair. Each layer splits a row's queries once and gathers its blocks' keys and values once, with the blocks'
cells and masks worked out once per pass (:class:`SegmentPlan`), not sliced block by block: backward then
zero-fills and adds each tensor once instead of once per block (SmolLM2's attention on four HH pairs, forward and
backward of a layer: 6.5 to 4.9 ms, against 4.3 ms for the kernels alone).

transformers calls the function registered for the model's attention implementation with the keyword arguments
the model's forward received. :func:`install` registers, under ``"sdpa"``, a function that runs per segment when
it is given :data:`SEGMENTS` (the body's input from :func:`lightning_pref.packing.body_inputs`) and is
transformers' own sdpa, called as it is, otherwise: generation, padded batches, other code in the process. It
replaces a process-wide registration, hence once, on first use, and only around that function.

The same function keeps prompts' keys and values for a later pass (:class:`PromptKV`, the body's :data:`PROMPTS`
argument): one pass records them, layer by layer, and a pass whose segments continue those prompts attends to
them as if the prompts were in its rows. KTO's mismatched completions continue the batch's own prompts this way,
so only the completions run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_utils import AttentionInterface

from lightning_pref.layout import Segment

#: The body's keyword argument: a :class:`SegmentPlan`, each row's segments (:func:`lightning_pref.layout.segment_spans`).
SEGMENTS = "attention_segments"

#: The body's keyword argument: a :class:`PromptKV` to record into, or to continue from.
PROMPTS = "attention_prompts"

_sdpa: Callable[..., tuple[Tensor, Any]] | None = None  # transformers' sdpa, kept when install() replaces it

# Keyword arguments of an attention call that leave sdpa's scores as they are (what Llama, Qwen2, Gemma 3 and
# GPT-2 pass; the sliding window is in the mask).
_PLAIN_KWARGS = frozenset({"dropout", "scaling", "position_ids", "use_cache", "sliding_window", "cache_position"})


@dataclass
class PromptKV:
    """Prompts' keys and values, recorded by one pass and attended to by a later one.

    Attributes:
        spans: ``(row, start, end)`` cells of each prompt in the recording pass's rows.
        continues: in the continuing pass, the prompt each of its segments continues (row-major segment order);
            ``None`` while recording.
        layers: per attention layer (``layer_idx``), each prompt's keys and values, detached.
            # [P] of ((1, H_kv, P_p, D), (1, H_kv, P_p, D))
        last_hidden: the recording pass's final hidden state at each prompt's last cell, which predicts the
            first token of its continuation (set by the caller). # (P, H)
    """

    spans: list[tuple[int, int, int]]
    continues: list[int] | None = None
    layers: dict[int, list[tuple[Tensor, Tensor]]] = field(default_factory=dict)
    last_hidden: Tensor | None = None

    def complete(self, num_layers: int) -> bool:
        """Whether every one of ``num_layers`` attention layers recorded the prompts (a model whose attention is
        not called with the body's keyword arguments records nothing)."""
        return self.last_hidden is not None and set(self.layers) == set(range(num_layers))


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
    prompts: PromptKV | None = kwargs.pop(PROMPTS, None)
    if prompts is not None and prompts.continues is None and hasattr(module, "layer_idx"):
        # Recorded again when backward recomputes a checkpointed layer: the same values.
        prompts.layers[module.layer_idx] = [(key[r : r + 1, :, s:e].detach(), value[r : r + 1, :, s:e].detach())
                                            for r, s, e in prompts.spans]
    elif prompts is not None:
        return _continue(module, query, key, value, spans, prompts, *args, **kwargs)
    if spans is None or attention_mask is None or attention_mask.dim() != 4 or key.shape[2] != query.shape[2]:
        return _sdpa(module, query, key, value, attention_mask, *args, **kwargs)
    heads, dim = query.shape[1], query.shape[3]
    rows = []
    for q, k, v, blocks in zip(_rows(query), _rows(key), _rows(value), spans.blocks(attention_mask), strict=True):
        # One split of the row's queries and one gather of its keys and values per layer, not a slice per
        # block: backward then fills and adds each tensor once, not once per block.
        queries = q.split(blocks.query_sizes, 2)
        keys = k.index_select(2, blocks.key_cells).split(blocks.key_sizes, 2)
        values = v.index_select(2, blocks.key_cells).split(blocks.key_sizes, 2)
        rows.append(torch.cat([q_.new_zeros(1, q_.shape[2], heads, dim) if b is None
                               else _attend(module, q_, keys[b], values[b], blocks.masks[b], *args, **kwargs)
                               for q_, b in zip(queries, blocks.pieces, strict=True)], 1))
    return (rows[0] if len(rows) == 1 else torch.cat(rows, 0)), None


@dataclass
class RowBlocks:
    """One row's blocks (:meth:`~lightning_pref.layout.Segment.blocks`) as the attention of one layer takes them.

    Attributes:
        query_sizes: the row's cells in order, as pieces: each block's queries, and filler between segments.
        pieces: per piece, its block's index, or ``None`` for filler.
        key_cells: every block's key cells, block after block (a shared prompt once per block that sees it).
            # (K,)
        key_sizes: per block, its number of keys.
        masks: per block, its queries' rows and keys' columns of the row's mask. # [B] of (1, 1, Q_b, K_b)
    """

    query_sizes: list[int]
    pieces: list[int | None]
    key_cells: Tensor
    key_sizes: list[int]
    masks: list[Tensor]


class SegmentPlan:
    """What the body's :data:`SEGMENTS` argument carries: each row's segments, and their blocks per attention
    mask, worked out on the first layer that sees the mask and reused by the others (and by backward's recompute
    of a checkpointed layer).

    Args:
        spans: for each row, its segments (:func:`lightning_pref.layout.segment_spans`).
    """

    def __init__(self, spans: list[list[Segment]]) -> None:
        self.spans = spans
        self._blocks: dict[int, tuple[Tensor, list[RowBlocks]]] = {}  # id(mask) -> (mask, its rows' blocks)

    def blocks(self, mask: Tensor) -> list[RowBlocks]:
        """Each row's blocks under ``mask`` (a model with sliding-window layers gives those layers another one).
        # mask: (R or 1, 1, L, L)"""
        cached = self._blocks.get(id(mask))
        if cached is None or cached[0] is not mask:
            cached = self._blocks[id(mask)] = (mask, [self._row(r, mask) for r in range(len(self.spans))])
        return cached[1]

    def _row(self, r: int, mask: Tensor) -> RowBlocks:
        row_mask = mask[r : r + 1] if mask.shape[0] > 1 else mask
        sizes: list[int] = []
        pieces: list[int | None] = []
        keys: list[Tensor] = []
        masks: list[Tensor] = []
        column = 0
        for span in self.spans[r]:
            for queries, key_slices in span.blocks():
                if queries.start > column:  # filler before the segment
                    sizes.append(queries.start - column)
                    pieces.append(None)
                cells = torch.cat([torch.arange(k.start, k.stop, device=mask.device) for k in key_slices])
                sizes.append(queries.stop - queries.start)
                pieces.append(len(keys))
                keys.append(cells)
                masks.append(row_mask[:, :, queries][..., cells])
                column = queries.stop
        if column < mask.shape[-1]:
            sizes.append(mask.shape[-1] - column)
            pieces.append(None)
        return RowBlocks(sizes, pieces, torch.cat(keys), [len(k) for k in keys], masks)


def _rows(states: Tensor) -> tuple[Tensor, ...]:
    """A batch's rows, each ``(1, ...)``: one split (backward concatenates once), none for a single row."""
    return (states,) if states.shape[0] == 1 else states.split(1)


def _attend(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: Tensor, *args: Any,
            **kwargs: Any) -> Tensor:
    """transformers' sdpa on one block, with grouped-query attention inside the kernel on a CPU.

    With a mask, transformers repeats each key and value head for its group of query heads (GPU kernels that
    take a mask run grouped queries on the slow path); the CPU kernel takes them as they are: 15% less attention
    time on SmolLM2's segments, the same values. Anything that changes the scores (a position bias, soft-capping,
    attention sinks) goes through transformers. # -> (1, L_q, H, D)
    """
    assert _sdpa is not None, "segment_attention.install() registers this function"
    if (query.device.type != "cpu" or getattr(module, "num_key_value_groups", 1) == 1 or args
            or not set(kwargs) <= _PLAIN_KWARGS):
        return _sdpa(module, query, key, value, mask, *args, **kwargs)[0]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=kwargs.get("dropout", 0.0),
                                         scale=kwargs.get("scaling"), enable_gqa=True)  # (1, H, L_q, D)
    return out.transpose(1, 2).contiguous()


def _continue(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, spans: SegmentPlan,
              prompts: PromptKV, *args: Any, **kwargs: Any) -> tuple[Tensor, None]:
    """Each segment attends to the recorded keys and values of the prompt it continues, then causally to itself
    (the prompt's positions come first: the segment's own positions start after them). # -> (R, L, H, D)"""
    recorded = prompts.layers[module.layer_idx]

    def segment(r: int, span: Segment, index: int) -> Tensor:
        prompt_key, prompt_value = recorded[prompts.continues[index]]
        cells = slice(span.start, span.end)
        n, p = span.end - span.start, prompt_key.shape[2]
        causal = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
        mask = torch.cat([causal.new_ones(n, p), causal], 1)[None, None]  # (1, 1, n, p + n)
        return _attend(module, query[r : r + 1, :, cells], torch.cat([prompt_key, key[r : r + 1, :, cells]], 2),
                       torch.cat([prompt_value, value[r : r + 1, :, cells]], 2), mask, *args, **kwargs)

    return _by_segment(query, spans.spans, segment), None


def _by_segment(query: Tensor, spans: list[list[Segment]], segment: Callable[[int, Segment, int], Tensor]) -> Tensor:
    """The rows' attention output from ``segment(row, span, index)`` of each segment (``index``: its place in
    row-major order), zeros on cells outside every segment (filler, which nothing reads).
    # (R, H, L, D) -> (R, L, H, D)"""
    length, heads, dim = query.shape[2], query.shape[1], query.shape[3]
    rows, index = [], 0
    for r, row_spans in enumerate(spans):
        pieces, column = [], 0
        for span in row_spans:
            if span.start > column:
                pieces.append(query.new_zeros(1, span.start - column, heads, dim))
            pieces.append(segment(r, span, index))  # (1, end - start, H, D)
            column, index = span.end, index + 1
        if column < length:
            pieces.append(query.new_zeros(1, length - column, heads, dim))
        rows.append(torch.cat(pieces, 1))
    return torch.cat(rows, 0)
