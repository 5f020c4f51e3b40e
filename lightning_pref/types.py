"""The typed contract between data, module and loss.

Names follow the DPO paper (Rafailov et al., 2023): ``policy_chosen_logps``, ``reference_rejected_logps``,
``chosen_rewards``, ``beta``. ``N`` is the number of sequences in a batch; for paired data ``N = 2B`` with the
``B`` chosen sequences first and their ``B`` rejected partners after them, in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor


@dataclass
class SequenceLogps:
    """Log-probabilities summed over response tokens, one value per sequence.

    For unpaired losses (KTO) ``chosen`` holds the desirable and ``rejected`` the undesirable examples, and the
    two may have different lengths.
    """

    chosen: Tensor  # (B,) or (B_desirable,)
    rejected: Tensor  # (B,) or (B_undesirable,)
    chosen_tokens: Tensor  # (B,) number of response tokens summed into ``chosen``
    rejected_tokens: Tensor  # (B,)

    @property
    def chosen_mean(self) -> Tensor:
        """Per-token average log-prob of each chosen response (length-normalized)."""
        return self.chosen / self.chosen_tokens.clamp(min=1)

    @property
    def rejected_mean(self) -> Tensor:
        """Per-token average log-prob of each rejected response (length-normalized)."""
        return self.rejected / self.rejected_tokens.clamp(min=1)

    @classmethod
    def split(cls, logps: Tensor, tokens: Tensor, num_chosen: int) -> SequenceLogps:
        """Split per-sequence values of a concatenated ``[chosen; rejected]`` batch."""
        return cls(logps[:num_chosen], logps[num_chosen:], tokens[:num_chosen], tokens[num_chosen:])


@dataclass
class LossOutput:
    """What a loss plugin returns.

    Rewards are the loss's implicit rewards (``beta * (policy - reference)`` log-ratios for reference-based
    losses), detached: they are for metrics only.
    """

    losses: Tensor  # (B,) per-example, unreduced; unpaired losses: (B_desirable + B_undesirable,)
    chosen_rewards: Tensor  # (B,) detached
    rejected_rewards: Tensor  # (B,) detached
    metrics: dict[str, Tensor] = field(default_factory=dict)  # extra scalars to log, e.g. {"kl": ...}


@dataclass
class PackedRows:
    """``N`` sequences laid end to end in ``R`` rows of length ``L`` instead of padding each to ``T``
    (:mod:`lightning_pref.packing` builds and reads them).

    Each sequence occupies consecutive cells of one row, its positions counting from 0, so the model's own mask
    creation separates the sequences of a row (block-causal attention) from the restarts of ``position_ids``.
    With ``shared_prompts`` (paired batches) each pair is one segment ``[prompt, chosen, rejected]``: the prompt
    runs once and belongs to the chosen sequence, the rejected response continues at the prompt's length and an
    explicit ``attention_mask`` keeps it from seeing the chosen tokens. In general a row may continue the prompt of
    another (``prompt_owner``), as KTO's mismatched completions do in their prompts' segments.
    """

    input_ids: Tensor  # (R, L) token ids, filler cells hold the pad id
    position_ids: Tensor  # (R, L) each token's position in its own sequence; 0 on filler cells
    response_mask: Tensor  # (R, L) bool, True where the token is a response token
    sequence_index: Tensor  # (R, L) long, the batch row n in [0, N) each token belongs to; -1 on filler cells
    num_sequences: int  # N
    pad_token_id: int = 0
    shared_prompts: bool = False
    # shared_prompts only: True where query token i may attend to key token j (causal within a row's own cells and
    # its owner's prompt: rejected tokens blind to their chosen partner). L * L bools per row.
    attention_mask: Tensor | None = None  # (R, 1, L, L)
    # shared_prompts only: the row whose prompt cells each row continues (its own index where it holds its prompt).
    prompt_owner: Tensor | None = None  # (N,)

    @property
    def real_tokens(self) -> int:
        """Tokens the model runs on (a shared prompt counts once)."""
        return int((self.sequence_index >= 0).sum())

    @property
    def padding_fraction(self) -> float:
        """Share of the ``R * L`` cells that are filler."""
        return 1.0 - self.real_tokens / max(1, self.input_ids.numel())


class KLRows(NamedTuple):
    """KTO's mismatched prompt/completion rows for the KL baseline ``z0``, right-padded like a batch.

    Row ``m`` is the prompt of batch row ``prompt_rows[m]`` followed by another row's completion, so its first
    tokens repeat that batch row's prompt exactly (the scorer reuses their keys and values).
    """

    input_ids: Tensor  # (M, T')
    attention_mask: Tensor  # (M, T')
    response_mask: Tensor  # (M, T')
    prompt_rows: Tensor  # (M,) index of the batch row whose prompt the row starts with
    # A packed batch's KL rows are also packed (scored without their padding), in this row order.
    packed: PackedRows | None = None
    # A packed batch's rows and then these rows, packed together: row N + m's completion continues the prompt of
    # batch row prompt_rows[m] in that row's segment, so only the completions run. Also without KL rows.
    shared: PackedRows | None = None
    # Only the completions, packed, at the positions after their prompts: run on the batch pass's recorded prompt
    # keys and values (lightning_pref.segment_attention.PromptKV).
    completions: PackedRows | None = None


@dataclass
class PreferenceBatch:
    """A collated batch of ``N`` sequences ``prompt + response``: right-padded to a common length ``T``, or
    packed (``packed``, see :class:`PackedRows`), in which case the padded tensors are ``None``.

    Rows ``[:num_chosen]`` are chosen (desirable) and rows ``[num_chosen:]`` rejected (undesirable). A batch is
    *paired* when both halves have the same size and row ``i`` pairs with row ``num_chosen + i``. Packing changes
    only how the sequences are laid out for the model: per-sequence values come back in this row order.
    """

    input_ids: Tensor | None  # (N, T) token ids, padded with the tokenizer's pad id
    attention_mask: Tensor | None  # (N, T) 1 for real tokens, 0 for padding
    response_mask: Tensor | None  # (N, T) bool, True where the token is a response token that is scored
    num_chosen: int
    paired: bool = True
    # Mismatched prompt/completion rows for KTO's KL baseline z0; absent unless the loss asks for a KL baseline.
    kl_rows: KLRows | None = None
    # ``reference_mode: precomputed``: the cached reference log-prob of each row (set before the step).
    reference_logps: Tensor | None = None  # (N,)
    # Where each row comes from: the split, its example's index there and which response it is (0 chosen,
    # desirable or the only one; 1 rejected), e.g. to look up precomputed reference log-probs.
    split: str = ""
    example_index: Tensor | None = None  # (N,)
    response_column: Tensor | None = None  # (N,)
    # Per-sequence weights for metrics: 0 marks duplicates a distributed sampler padded in, so epoch metrics
    # count every example exactly once.
    weights: Tensor | None = None  # (N,)
    # Paired data with a margin column (reward models, as in Llama 2): each pair's margin; missing ones are 0.
    margins: Tensor | None = None  # (B,)
    # ``data.packing``: the sequences packed into rows (the padded tensors above are then ``None``).
    packed: PackedRows | None = None

    @property
    def num_sequences(self) -> int:
        """``N``, whichever the layout."""
        return self.packed.num_sequences if self.packed is not None else self.input_ids.shape[0]

    @property
    def num_rejected(self) -> int:
        return self.num_sequences - self.num_chosen

    @property
    def real_tokens(self) -> int:
        """Tokens the model runs on, padding and filler left out."""
        return self.packed.real_tokens if self.packed is not None else int(self.attention_mask.sum())

    @property
    def padding_fraction(self) -> float:
        """Share of the cells the model runs on that are padding or filler."""
        if self.packed is not None:
            return self.packed.padding_fraction
        return 1.0 - self.real_tokens / max(1, self.attention_mask.numel())

    @property
    def device(self) -> torch.device:
        return (self.packed.input_ids if self.packed is not None else self.input_ids).device


@dataclass
class PromptBatch:
    """Prompts to generate from, left-padded to a common length ``P`` (generation continues every row from its
    last token). ``B`` prompts."""

    input_ids: Tensor  # (B, P)
    attention_mask: Tensor  # (B, P) 1 for real prompt tokens
    index: Tensor  # (B,) each prompt's row in its source, for writing results in input order
    prompts: list[Any] = field(default_factory=list)  # [B] each prompt as the data gave it (text or messages)
    weights: Tensor | None = None  # (B,) 0 for duplicates a distributed sampler padded in
    # ``data.packing``: how batches built from these prompts' completions are laid out (on-policy pairs).
    packing: bool | str = False

    def token_ids(self) -> list[list[int]]:
        """Each prompt's own token ids, its left padding dropped (what the sampler continues). # [B][P_b]"""
        return [row[mask.bool()].tolist() for row, mask in zip(self.input_ids, self.attention_mask, strict=True)]
