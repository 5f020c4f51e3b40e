"""Batch layouts as data: padding and packing, the lowest floor of the package (only ``torch`` and ``types``).

A batch of ``N`` sequences ``prompt + response`` reaches a model in one of three layouts:

- **padded** (:func:`pad`): each sequence in its own row, right-padded to the longest; prompts for generation are
  left-padded instead (:func:`left_pad`), so every row continues from its last token;
- **packed** (:func:`pack`): sequences laid end to end in rows (best-fit decreasing, row length chosen by
  :func:`row_bins`), positions restarting at 0 for each, little compute on filler (:class:`~lightning_pref.types.PackedRows`);
- **packed with shared prompts** (:func:`pack` with ``share_prompts``): each pair one segment ``[prompt, chosen,
  rejected]``, its prompt run once, an explicit mask (:func:`shared_prompt_mask`) keeping the rejected response
  blind to the chosen one; more generally (``prompt_owners``) any rows that continue another row's prompt, such as
  KTO's mismatched completions.

The readers give the per-sequence view back: which cells are scored and from which hidden state
(:func:`scored_tokens`), each sequence's last cell (:func:`last_cells`), per-sequence sums
(:func:`sequence_sums`), the sequences themselves (:func:`sequences`), and the other layouts of the same batch
(:func:`unpack`, :func:`unshare`). What a *model* can run is decided in :mod:`lightning_pref.packing`.
"""

from __future__ import annotations

import bisect
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from lightning_pref.types import PackedRows, PreferenceBatch

Sequence = tuple[list[int], list[int]]  # (prompt ids, response ids)

#: ``data.packing``: ``false`` pads; ``true`` packs; ``shared`` also runs each pair's prompt once; ``auto`` (the
#: default) is what measured fastest: shared prompts for pairs, plain packing for unpaired examples. A model that
#: cannot take shared prompts gets plain packing, one that cannot take packed rows padding, with an info line.
Packing = bool | Literal["auto", "shared"]


def pad(sequences: list[Sequence], pad_token_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad ``prompt + response`` sequences to the longest one.

    Returns:
        ``input_ids``, ``attention_mask`` and the boolean ``response_mask``. # each (N, T)
    """
    length = max((len(p) + len(r) for p, r in sequences), default=0)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    response_mask = torch.zeros((len(sequences), length), dtype=torch.bool)
    for row, (prompt, response) in enumerate(sequences):
        n = len(prompt) + len(response)
        input_ids[row, :n] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[row, :n] = 1
        response_mask[row, len(prompt) : n] = True
    return input_ids, attention_mask, response_mask


def left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad prompt ids (generation continues every row from its last token). # -> (B, P), (B, P)"""
    length = max((len(p) for p in prompts), default=0)
    ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, length - len(prompt) :] = torch.tensor(prompt)
            mask[row, length - len(prompt) :] = 1
    return ids, mask


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


# A row's cost per (query, key) pair over a linear layer's cost per token. Attention over the whole row's mask
# costs 4 d FLOPs a pair against 2 P, P ~ 12 d^2, a token: 1 / (6 d) of a token. sdpa (the default) runs each
# segment apart (lightning_pref.segment_attention), so there a row's pairs cost only its mask (L^2 booleans)
# and building it. 6 * 4096: the attention of d = 4096 models, and for narrower eager models rows that cost a
# few percent more attention than they could; the term stops rows from growing without bound (a row of 4,096
# cells pays 17% on top, a 16 MB mask).
_TOKENS_PER_PAIR = 6 * 4096


def row_bins(lengths: list[int]) -> list[list[int]]:
    """Segments into rows (:func:`best_fit_decreasing`) of the capacity whose rectangle costs least.

    A row runs the linear layers on all its ``L`` cells, filler included, and its mask has ``L^2`` entries;
    attention over the whole row computes all ``L^2`` pairs where it takes the dense mask (eager; sdpa runs each
    segment apart instead, :mod:`lightning_pref.segment_attention`). Rows as long as the longest segment leave
    filler when segments do not pair up (four DPO pairs of 80-110 tokens: 4 rows of 110, 18% filler); longer
    rows leave less filler and cost more attention (or mask). Each capacity ``k`` times the longest segment is
    tried and the one minimising ``R L + R L^2 / (6 d)`` kept (``R`` rows of ``L`` cells, ``d`` see
    ``_TOKENS_PER_PAIR``): the quadratic term also keeps rows, and their masks, bounded where attention is not.
    Measured on SmolLM2-135M with four HH pairs and a dense mask: 4 rows of 109 cells 5.3-5.7 s, 1 row of 384
    5.1-5.3 s per policy forward + backward + reference forward (per segment: 4.0 s). On HH's multi-turn rows
    (p90 316 tokens) ``6 * 512`` instead of ``6 * 4096`` left 7% (DPO) and 18% (KTO) of the cells filler.
    """
    longest, total = max(lengths, default=0), sum(lengths)
    best, best_cost = [], float("inf")
    for k in range(1, len(lengths) + 1):
        bins = best_fit_decreasing(lengths, k * longest)
        width = max(sum(lengths[s] for s in b) for b in bins)
        cost = len(bins) * width * (1 + width / _TOKENS_PER_PAIR)
        if cost < best_cost:
            best, best_cost = bins, cost
        # No filler at all would still cost total * (1 + width / d'): wider rows cannot do better.
        if len(bins) == 1 or total * (1 + width / _TOKENS_PER_PAIR) >= best_cost:
            break
    return best


def shares_prompts(packing: Packing, paired: bool) -> bool:
    """Whether ``data.packing`` puts each pair's prompt once in a shared segment."""
    return paired and packing in ("shared", "auto")


def same_prompt_owners(sequences: list[Sequence]) -> list[int]:
    """For each sequence, the first sequence with the same prompt: ``pack``'s ``prompt_owners`` that run each
    prompt once for all its completions (e.g. a rollout's ``k`` samples of a prompt)."""
    first: dict[tuple[int, ...], int] = {}
    return [first.setdefault(tuple(prompt), i) for i, (prompt, _) in enumerate(sequences)]


def pack(sequences: list[Sequence], pad_token_id: int, share_prompts: bool = False,
         prompt_owners: list[int] | None = None) -> PackedRows:
    """Lay ``sequences`` (``(prompt, response)`` ids in batch row order) end to end in rows.

    Args:
        sequences: the batch's ``N`` sequences; with ``share_prompts`` a paired batch ``[chosen; rejected]``
            whose row ``i`` and ``N/2 + i`` have the same prompt.
        pad_token_id: id of the filler cells.
        share_prompts: one segment ``[prompt, chosen, rejected]`` per pair (see :class:`PackedRows`); the same as
            ``prompt_owners = [0, ..., N/2 - 1] * 2``.
        prompt_owners: for each row, the row whose prompt it continues (its own index where it holds its prompt;
            a continuing row's prompt must equal its owner's). Each owner's segment is ``[prompt, its response,
            the responses of the rows continuing it]``, e.g. KTO's mismatched completions in their prompts'
            segments (:func:`lightning_pref.kl.mismatched_rows`).
    """
    n = len(sequences)
    if share_prompts:
        prompt_owners = list(range(n // 2)) * 2
    owners = list(range(n)) if prompt_owners is None else list(prompt_owners)
    shared = any(o != i for i, o in enumerate(owners))
    members: dict[int, list[int]] = {}  # owner -> its rows in segment order: the owner first, then continuations
    for i in sorted(range(n), key=lambda i: (owners[i], owners[i] != i, i)):
        members.setdefault(owners[i], []).append(i)
    parts = [_parts(sequences, rows) for rows in members.values()]
    lengths = [sum(len(ids) for ids, *_ in segment) for segment in parts]
    bins = row_bins(lengths)
    shape = (len(bins), max((sum(lengths[s] for s in b) for b in bins), default=0))
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    response_mask = torch.zeros(shape, dtype=torch.bool)
    sequence_index = torch.full(shape, -1, dtype=torch.long)
    for row, segments in enumerate(bins):
        column = 0
        for s in segments:
            for ids, i, start, response in parts[s]:
                cells = slice(column, column + len(ids))
                input_ids[row, cells] = torch.tensor(ids, dtype=torch.long)
                position_ids[row, cells] = torch.arange(start, start + len(ids))
                response_mask[row, cells] = response
                sequence_index[row, cells] = i
                column += len(ids)
    packed = PackedRows(input_ids, position_ids, response_mask, sequence_index, n, pad_token_id, shared_prompts=shared)
    if shared:
        packed.prompt_owner = torch.tensor(owners, dtype=torch.long)
        packed.attention_mask = shared_prompt_mask(sequence_index, response_mask, packed.prompt_owner)
    return packed


def continuations(sequences: list[Sequence], pad_token_id: int) -> PackedRows:
    """The responses of ``sequences`` alone, packed, each at the positions that follow its prompt: a pass that
    attends to the prompts' recorded keys and values (:class:`lightning_pref.segment_attention.PromptKV`) runs
    only these cells. Every cell is a response cell, the first one of each sequence included."""
    packed = pack([([], response) for _, response in sequences], pad_token_id)
    offsets = torch.tensor([len(prompt) for prompt, _ in sequences], dtype=torch.long)
    real = packed.sequence_index >= 0
    packed.position_ids[real] += offsets[packed.sequence_index[real]]
    return packed


def _parts(sequences: list[Sequence], rows: list[int]) -> list[tuple]:
    """``(ids, row, first position, is response)`` of each part of a segment: the owner's prompt and response,
    then each continuing row's response at the prompt's positions."""
    owner, *continuing = rows
    prompt, response = sequences[owner]
    return [(prompt, owner, 0, False), (response, owner, len(prompt), True),
            *((sequences[i][1], i, len(prompt), True) for i in continuing)]


def shared_prompt_mask(sequence: Tensor, response: Tensor, owner: Tensor) -> Tensor:
    """Causal within each sequence, a continuing row's response also seeing its owner's prompt and nothing else of
    the segment (e.g. a rejected response blind to the chosen one). # -> (R, 1, L, L)

    Args:
        sequence: each cell's batch row, -1 on filler. # (R, L)
        response: True on response cells. # (R, L)
        owner: the row whose prompt each row continues (its own index where it holds its prompt). # (N,)
    """
    length = sequence.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()  # (L, L) query i sees key j <= i
    real = sequence >= 0  # (R, L)
    own = (sequence[:, :, None] == sequence[:, None, :]) & real[:, :, None]  # (R, L, L) same row
    prompt_key = ~response & real  # (R, L) a cell of some row's prompt
    query_owner = owner[sequence.clamp(min=0)]  # (R, L) whose prompt each query cell continues
    owners_prompt = prompt_key[:, None, :] & (sequence[:, None, :] == query_owner[:, :, None]) & real[:, :, None]
    allowed = causal & (own | owners_prompt)  # (R, L, L)
    # A filler cell attends to itself: a query row that sees nothing would softmax to NaN.
    allowed |= torch.eye(length, dtype=torch.bool) & ~real[:, :, None]
    return allowed[:, None]


def scored_tokens(packed: PackedRows) -> tuple[Tensor, Tensor, Tensor]:
    """Which cells are scored, which cell's hidden state predicts each, and the sequence each belongs to.

    A response token is scored from the token before it in its own sequence, never from the end of the previous
    sequence in the row: a sequence's first token (position 0, an empty prompt's first response token) is not
    scored, as in a padded row. With shared prompts a continuing row's first token (the rejected response's) is
    predicted from its owner's prompt's last token, not from the response before it in the segment.

    Returns:
        ``(cells, predictors, sequences)``, flat indices into ``R * L`` and batch rows. # each (S,)
    """
    flat_sequence = packed.sequence_index.flatten()  # (R * L,)
    cells = (packed.response_mask & (packed.position_ids > 0)).flatten().nonzero().squeeze(-1)  # (S,)
    sequences_ = flat_sequence[cells]
    predictors = cells - 1
    if packed.shared_prompts:
        # A continuing row's first token follows another row's response in the segment: it is predicted from the
        # last cell of its owner's prompt instead (an owner's own first token follows its own prompt).
        first_continuing = flat_sequence[predictors] != sequences_
        prompt_cells = (~packed.response_mask.flatten() & (flat_sequence >= 0)).nonzero().squeeze(-1)  # (P,)
        last_prompt_cell = torch.full((packed.num_sequences,), -1, dtype=torch.long, device=cells.device)
        last_prompt_cell = last_prompt_cell.scatter_reduce(0, flat_sequence[prompt_cells], prompt_cells, "amax")
        owners = packed.prompt_owner.to(cells.device)[sequences_]  # (S,)
        predictors = torch.where(first_continuing, last_prompt_cell[owners], predictors)
    return cells, predictors, sequences_


class Segment(NamedTuple):
    """One segment of a packed row, as cells: ``[start, end)``, of which ``[start, prompt_end)`` is its owner's
    prompt; where other rows continue that prompt (``prompt_owner``), the cell each continuing response starts
    at (the owner's own response runs from ``prompt_end`` to the first of them)."""

    start: int
    end: int
    prompt_end: int
    continuations: tuple[int, ...] = ()

    def blocks(self) -> list[tuple[slice, list[slice]]]:
        """``(queries, keys)`` cells of each part that attends on its own: the owner's prompt and response to
        themselves, each continuing response to the prompt and itself; nothing else of the segment is visible to
        it (:func:`shared_prompt_mask`)."""
        ends = [*self.continuations, self.end]
        owner = slice(self.start, ends[0])
        prompt = slice(self.start, self.prompt_end)
        continuing = [slice(a, b) for a, b in zip(ends, ends[1:], strict=False)]
        return [(owner, [owner]), *((cells, [prompt, cells]) for cells in continuing)]


def segment_spans(packed: PackedRows) -> list[list[Segment]]:
    """For each row, its segments: a sequence, or a prompt with every row continuing it (``prompt_owner``). Cells
    of different segments never attend to one another; filler is in none. # (R, L) -> [R] lists of Segment"""
    group = packed.sequence_index.clone()  # (R, L) the segment's owner row of each cell, -1 on filler
    if packed.prompt_owner is not None:
        real = group >= 0
        group[real] = packed.prompt_owner[group[real]]
    spans = []
    for row_group, row_sequence, row_response in zip(group, packed.sequence_index, packed.response_mask,
                                                     strict=True):
        starts = _changes(row_group)
        sequence_starts = _changes(row_sequence)
        response = row_response.nonzero().flatten().tolist()  # response cells, ascending
        segments = []
        for s, e in zip(starts, [*starts[1:], len(row_group)], strict=True):
            if row_group[s] < 0:
                continue
            first_response = bisect.bisect_left(response, s)
            prompt_end = min(response[first_response], e) if first_response < len(response) else e
            segments.append(Segment(s, e, prompt_end, tuple(c for c in sequence_starts if s < c < e)))
        spans.append(segments)
    return spans


def _changes(values: Tensor) -> list[int]:
    """Cells where a row's value differs from the one before, and cell 0. # (L,) -> list"""
    return [0, *((values[1:] != values[:-1]).nonzero().flatten() + 1).tolist()]


def last_cells(packed: PackedRows) -> Tensor:
    """Flat index into ``R * L`` of each sequence's last token (a reward model reads it). # -> (N,)"""
    return _edge_cells(packed, "amax")


def first_cells(packed: PackedRows) -> Tensor:
    """Flat index into ``R * L`` of each sequence's first cell (its own prompt's first token, where it holds one).
    # -> (N,)"""
    return _edge_cells(packed, "amin")


def _edge_cells(packed: PackedRows, reduce: Literal["amin", "amax"]) -> Tensor:
    flat = packed.sequence_index.flatten()  # (R * L,)
    cells = torch.arange(flat.numel(), device=flat.device)
    real = flat >= 0
    edge = torch.full((packed.num_sequences,), -1, dtype=torch.long, device=flat.device)
    return edge.scatter_reduce(0, flat[real], cells[real], reduce, include_self=False)


def sequence_sums(values: Tensor, sequences_: Tensor, num_sequences: int) -> Tensor:
    """Sum per-token ``values`` per batch row. # (S,), (S,) -> (N,)"""
    return values.new_zeros(num_sequences).index_add(0, sequences_, values)


def unpacked_sequences(packed: PackedRows) -> list[Sequence]:
    """The ``(prompt, response)`` ids of each batch row again (a shared prompt given to both rows)."""
    ids, sequence, response = (t.flatten().tolist() for t in (packed.input_ids.cpu(), packed.sequence_index.cpu(),
                                                               packed.response_mask.cpu()))
    out: list[Sequence] = [([], []) for _ in range(packed.num_sequences)]
    for token, n, is_response in zip(ids, sequence, response, strict=True):
        if n >= 0:
            out[n][1 if is_response else 0].append(token)
    if packed.shared_prompts:  # a continuing row's prompt is its owner's
        out = [(out[o][0], r) for o, (_, r) in zip(packed.prompt_owner.tolist(), out, strict=True)]
    return out


def padded_sequences(input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor) -> list[Sequence]:
    """The ``(prompt, response)`` ids of each right-padded row. # (N, T) each -> [N]"""
    out = []
    for ids, attended, response in zip(input_ids.tolist(), attention_mask.tolist(), response_mask.tolist(),
                                       strict=True):
        real = [(t, r) for t, a, r in zip(ids, attended, response, strict=True) if a]
        out.append(([t for t, r in real if not r], [t for t, r in real if r]))
    return out


def sequences(batch: PreferenceBatch) -> list[Sequence]:
    """The ``(prompt, response)`` ids of each of a batch's ``N`` rows, whichever its layout."""
    if batch.packed is not None:
        return unpacked_sequences(batch.packed)
    return padded_sequences(batch.input_ids, batch.attention_mask, batch.response_mask)


def unpack(packed: PackedRows) -> tuple[Tensor, Tensor, Tensor]:
    """The padded ``input_ids``, ``attention_mask`` and ``response_mask`` of the same batch, on its device.
    # each (N, T)"""
    return tuple(t.to(packed.input_ids.device) for t in pad(unpacked_sequences(packed), packed.pad_token_id))


def unshare(packed: PackedRows) -> PackedRows:
    """The same batch packed without shared prompts, on its device."""
    plain = pack(unpacked_sequences(packed), packed.pad_token_id)
    device = packed.input_ids.device
    return PackedRows(*(t.to(device) for t in (plain.input_ids, plain.position_ids, plain.response_mask,
                                                plain.sequence_index)), plain.num_sequences, plain.pad_token_id)


def by_sequence(values: Tensor, sequences_: Tensor, num_sequences: int) -> tuple[Tensor, Tensor]:
    """Per-token values laid out one row per sequence, each row's values in their order, right-padded with 0.

    Args:
        values: one value per scored token, a sequence's values in order. # (S,)
        sequences_: the batch row of each. # (S,)
        num_sequences: ``N``.

    Returns:
        ``(table, mask)``: the values and where they are. # (N, L), (N, L) with L the longest row
    """
    counts = torch.bincount(sequences_, minlength=num_sequences)  # (N,)
    order = torch.argsort(sequences_, stable=True)  # grouped by sequence, each in its own order
    rows = sequences_[order]
    columns = torch.arange(len(order), device=values.device) - (counts.cumsum(0) - counts)[rows]
    width = int(counts.max()) if len(counts) else 0
    table = values.new_zeros(num_sequences, width)
    mask = torch.zeros(num_sequences, width, dtype=torch.bool, device=values.device)
    table[rows, columns] = values[order]
    mask[rows, columns] = True
    return table, mask
