"""Collating encoded examples into a :class:`~lightning_pref.types.PreferenceBatch` with dynamic padding."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lightning_pref.data.tokenize import Encoded
from lightning_pref.types import KLRows, PreferenceBatch

Sequence = tuple[list[int], list[int]]  # (prompt ids, response ids)


def pad(sequences: list[Sequence], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad ``prompt + response`` sequences to the longest one in the batch.

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


def mismatched(groups: list[object]) -> list[tuple[int, int]]:
    """For each row ``i`` the nearest following row ``k`` (cyclically) whose prompt differs from row ``i``'s.

    Used for KTO's KL baseline: prompt ``i`` with completion ``k`` is a sample from a *mismatched* pair, never
    the example's own completion, for any batch size (odd included). Rows whose prompt is the only one in the
    batch get no partner.
    """
    n = len(groups)
    pairs = []
    for i in range(n):
        k = next((k % n for k in range(i + 1, i + n) if groups[k % n] != groups[i]), None)
        if k is not None:
            pairs.append((i, k))
    return pairs


class PreferenceCollator:
    """Turns a list of :class:`Encoded` examples into a batch.

    Paired examples give ``[chosen rows; rejected rows]``; unpaired ones give ``[desirable; undesirable]``.

    Args:
        pad_token_id: the tokenizer's pad id (padding is masked everywhere).
        kl_baseline: also build the mismatched prompt/completion rows for KTO's KL baseline.
        reference_logps: returns the split's precomputed reference log-probs, ``(n, 2)`` indexed by example
            (column 0 chosen/completion, 1 rejected), or ``None`` when reference log-probs are not precomputed.
    """

    def __init__(
        self, pad_token_id: int, kl_baseline: bool = False,
        reference_logps: Callable[[], torch.Tensor | None] | None = None,
    ) -> None:
        self.pad_token_id = pad_token_id
        self.kl_baseline = kl_baseline
        self.reference_logps = reference_logps

    def __call__(self, examples: list[Encoded]) -> PreferenceBatch:
        paired = all(e.rejected is not None for e in examples)
        if paired:
            rows = [(e, 0) for e in examples] + [(e, 1) for e in examples]  # (example, column) of each row
            num_chosen = len(examples)
        elif any(e.rejected is not None for e in examples):
            raise ValueError("a batch mixes paired and unpaired examples")
        else:
            rows = [(e, 0) for e in examples if e.label] + [(e, 0) for e in examples if not e.label]
            num_chosen = sum(e.label for e in examples)
        # Column 0 is the chosen (or only) completion, 1 the rejected one; also the reference table's columns.
        ordered = [(e.prompt, e.rejected if column else e.chosen) for e, column in rows]
        input_ids, attention_mask, response_mask = pad(ordered, self.pad_token_id)
        batch = PreferenceBatch(input_ids, attention_mask, response_mask, num_chosen=num_chosen, paired=paired)
        if any(e.weight != 1.0 for e in examples):
            batch.weights = torch.tensor([e.weight for e, _ in rows])
        table = self.reference_logps() if self.reference_logps is not None else None
        if table is not None:
            batch.reference_logps = table[[e.index for e, _ in rows], [column for _, column in rows]]  # (N,)
        if self.kl_baseline:
            pairs = mismatched([tuple(prompt) for prompt, _ in ordered])
            kl_sequences = [(ordered[i][0], ordered[k][1]) for i, k in pairs]
            prompt_rows = torch.tensor([i for i, _ in pairs], dtype=torch.long)
            batch.kl_rows = KLRows(*pad(kl_sequences, self.pad_token_id), prompt_rows)
        return batch
