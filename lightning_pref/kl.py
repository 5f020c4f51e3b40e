r"""KTO's KL baseline :math:`z_0`: which rows estimate it and how ranks combine.

KTO (Ethayarajh et al. 2024, §4.1) compares each reward with a reference point
:math:`z_0 = \max(0, \mathbb{E}[\log \pi_\theta(y'|x) - \log \pi_{ref}(y'|x)])` over *mismatched* pairs: a
prompt :math:`x` with the completion :math:`y'` of another example, never its own.

- :func:`mismatched_rows`: each row's prompt with the completion of the nearest following row with another
  prompt, right-padded like a batch (:class:`~lightning_pref.types.KLRows`), and for packed batches also packed,
  alone and in their prompts' segments; built on the CPU by the module that trains a loss needing them, before
  the batch moves to the device.
- Scoring them is the scorer's work (:class:`lightning_pref.logps.SequenceScorer`: only their completions run, on
  the batch's own prompts, where the model allows it).
- :func:`kl_baseline`: the mean over all ranks of the rows' policy-minus-reference log-probs, clamped at 0 and
  detached (a baseline, not a path for gradients).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_pref.layout import Sequence, continuations, pack, pad
from lightning_pref.types import KLRows


def mismatched(groups: list[object]) -> list[tuple[int, int]]:
    """For each row ``i`` the nearest following row ``k`` (cyclically) whose prompt differs from row ``i``'s.

    Prompt ``i`` with completion ``k`` is a sample from a mismatched pair, never the example's own completion,
    for any batch size (odd included). Rows whose prompt is the only one in the batch get no partner.
    """
    n = len(groups)
    pairs = []
    for i in range(n):
        k = next((k % n for k in range(i + 1, i + n) if groups[k % n] != groups[i]), None)
        if k is not None:
            pairs.append((i, k))
    return pairs


def mismatched_rows(rows: list[Sequence], pad_token_id: int, packed: bool = False) -> KLRows:
    """The mismatched rows of a batch whose rows are ``rows`` (``(prompt, response)`` token ids, in order).

    For a packed batch they are also packed three ways (a packed pass keeps no K/V cache to take the prompts
    from): on their own, scored in full; together with the batch, each mismatched completion in the segment of the
    batch row whose prompt it continues (rows ``N, N + 1, ...`` of that layout); and the completions alone, to run
    on the prompts' keys and values recorded by the batch pass. The scorer picks
    (:meth:`lightning_pref.logps.SequenceScorer.prompt_kv`, :meth:`~lightning_pref.logps.SequenceScorer.kl_layout`).
    The second layout is built even without mismatched rows (then it is the batch packed again), so that every
    rank of a sharded run takes it alike.
    """
    pairs = mismatched([tuple(prompt) for prompt, _ in rows])
    sequences = [(rows[i][0], rows[k][1]) for i, k in pairs]
    prompt_rows = [i for i, _ in pairs]
    alone = pack(sequences, pad_token_id) if packed and sequences else None
    shared = pack(rows + sequences, pad_token_id, prompt_owners=list(range(len(rows))) + prompt_rows) if packed else None
    completions = continuations(sequences, pad_token_id) if packed and sequences else None
    return KLRows(*pad(sequences, pad_token_id), torch.tensor(prompt_rows, dtype=torch.long), alone, shared,
                  completions)


def kl_baseline(logratios: Tensor, strategy: Any = None) -> Tensor:
    """:math:`z_0`: the mean of the rows' policy-minus-reference log-probs over all ranks, clamped at 0.
    # (M,) -> ()

    Args:
        logratios: this rank's rows' ``policy - reference`` log-probs (may be empty).
        strategy: the trainer's strategy, whose ``reduce`` sums over ranks; ``None`` outside a trainer.
    """
    stats = torch.stack([logratios.sum().float(), torch.tensor(len(logratios), device=logratios.device).float()])
    # Every process joins the reduction, with or without rows of its own.
    stats = strategy.reduce(stats, reduce_op="sum") if strategy is not None else stats
    return (stats[0] / stats[1].clamp(min=1)).clamp(min=0).detach()
