"""Collating encoded examples into a :class:`~lightning_pref.types.PreferenceBatch`, padded or packed."""

from __future__ import annotations

import torch

from lightning_pref.data.tokenize import Encoded
from lightning_pref.layout import Packing, pack, pad, shares_prompts
from lightning_pref.types import PreferenceBatch


class PreferenceCollator:
    """Turns a list of :class:`Encoded` examples into a batch.

    Paired examples give ``[chosen rows; rejected rows]``; unpaired ones give ``[desirable; undesirable]``.

    Args:
        pad_token_id: the tokenizer's pad id (padding is masked everywhere).
        split: the split the examples come from, stamped on each batch (with each row's example index and
            response column) so per-example tables such as precomputed reference log-probs can be looked up.
        packing: lay the sequences end to end in rows instead of padding them (``batch.packed``, see
            :mod:`lightning_pref.layout`); ``shared`` and ``auto``: one segment per pair, its prompt once (paired
            batches; unpaired ones are packed plainly).
    """

    def __init__(self, pad_token_id: int, split: str = "", packing: Packing = False) -> None:
        self.pad_token_id = pad_token_id
        self.split = split
        self.packing = packing

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
        if self.packing:  # one layout only: the padded tensors are not built
            padded, packed = (None, None, None), pack(ordered, self.pad_token_id, shares_prompts(self.packing, paired))
        else:
            padded, packed = pad(ordered, self.pad_token_id), None
        batch = PreferenceBatch(
            *padded, num_chosen=num_chosen, paired=paired, split=self.split,
            example_index=torch.tensor([e.index for e, _ in rows], dtype=torch.long),
            response_column=torch.tensor([column for _, column in rows], dtype=torch.long), packed=packed,
        )
        if any(e.weight != 1.0 for e in examples):
            batch.weights = torch.tensor([e.weight for e, _ in rows])
        if paired and any(e.margin is not None for e in examples):
            batch.margins = torch.tensor([e.margin if e.margin is not None else 0.0 for e in examples])
        return batch
