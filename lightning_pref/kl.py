r"""KTO's KL baseline :math:`z_0`, in one place: which rows estimate it, how they are scored, how ranks combine.

KTO (Ethayarajh et al. 2024, §4.1) compares each reward with a reference point
:math:`z_0 = \max(0, \mathbb{E}[\log \pi_\theta(y'|x) - \log \pi_{ref}(y'|x)])` over *mismatched* pairs: a
prompt :math:`x` with the completion :math:`y'` of another example, never its own.

- :func:`mismatched_rows` (collate time): each row's prompt with the completion of the nearest following row
  with another prompt, right-padded like a batch (:class:`~lightning_pref.types.KLRows`).
- :func:`score_kl_rows` (inside a scorer's forward, where sharded strategies have gathered the parameters):
  where :func:`can_share_prompts` allows, only the completions run, on the batch's own K/V cut to each prompt;
  otherwise the rows are scored in full. Either way exactly one forward runs, also on a rank with no rows, so
  every rank of a sharded run issues the same collectives.
- :func:`kl_baseline`: the mean over all ranks of the rows' policy-minus-reference log-probs, clamped at 0 and
  detached (a baseline, not a path for gradients).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from lightning_pref import packing
from lightning_pref.head import sum_rows
from lightning_pref.types import KLRows

if TYPE_CHECKING:
    from lightning_pref.logps import SequenceScorer

Sequence = tuple[list[int], list[int]]  # (prompt ids, response ids)


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
    """The mismatched rows of a batch whose rows are ``rows`` (``(prompt, response)`` token ids, in order); of a
    packed batch, also packed (a packed pass keeps no K/V cache to share prompts from, so its KL rows run in
    full, and without their padding)."""
    from lightning_pref.data.collate import pad  # the batch's own padding
    from lightning_pref.packing import pack

    pairs = mismatched([tuple(prompt) for prompt, _ in rows])
    sequences = [(rows[i][0], rows[k][1]) for i, k in pairs]
    return KLRows(*pad(sequences, pad_token_id), torch.tensor([i for i, _ in pairs], dtype=torch.long),
                  pack(sequences, pad_token_id) if packed and sequences else None)


def checkpointed(model: nn.Module) -> bool:
    """Whether backward will recompute some of ``model``'s forward: Hugging Face's gradient checkpointing in
    training, or a checkpoint wrapper (Lightning's ``activation_checkpointing_policy``, torch's
    ``apply_activation_checkpointing``) around any of its modules."""
    if model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        return True
    return any(type(m).__name__ == "CheckpointWrapper" for m in model.modules())


def can_share_prompts(scorer: SequenceScorer, kl_rows: KLRows) -> bool:
    """Whether the KL rows can reuse the batch pass's prompt K/V.

    Needs a split head on a body that takes ``position_ids``, a non-empty prompt in every row, and a batch pass
    that backward will not recompute: a recomputed layer would run again on a cache that scoring the KL rows has
    since cropped and re-indexed. Passes without gradients (the reference's, validation) always qualify.
    """
    if not scorer.takes_position_ids or len(kl_rows.prompt_rows) == 0:
        return False
    if torch.is_grad_enabled() and checkpointed(scorer.lm):
        return False
    return bool((_prompt_lengths(kl_rows) > 0).all() and kl_rows.response_mask.any())


@torch.no_grad()
def score_kl_rows(scorer: SequenceScorer, kl_rows: KLRows, hidden: Tensor | None, cache: Any) -> Tensor:
    """Summed log-probs of ``kl_rows``, without gradient. # -> (M,)

    Args:
        scorer: the scorer whose forward is running.
        kl_rows: the batch's mismatched rows.
        hidden: the batch pass's final hidden states when it kept its cache (``None``: a packed pass). # (N, T, H)
        cache: the batch pass's K/V cache (``None``: score the rows in full).
    """
    if len(kl_rows.prompt_rows) == 0:  # every row of the batch shares one prompt: nothing to estimate here,
        # but other ranks run a forward, so this one does too (sharded strategies gather layers per forward)
        device = kl_rows.input_ids.device  # where the batch is, also after a packed pass that kept no hidden states
        ids, attention, response = (t[:1, :2] for t in kl_rows[:3]) if kl_rows.input_ids.numel() else _dummy(device)
        scorer.score(ids, attention, response)
        return torch.zeros(0, dtype=torch.float32, device=device)
    if cache is not None and _plain_kv_cache(cache):
        return _score_continuations(scorer, hidden, cache, kl_rows)
    if kl_rows.packed is not None:
        usable, masks = packing.runnable(scorer.lm, kl_rows.packed)
        if usable is not None:
            return scorer.score_packed(usable, masks)[0]
    return scorer.score(kl_rows.input_ids, kl_rows.attention_mask, kl_rows.response_mask)[0]


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


def _dummy(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    return ids, torch.ones_like(ids), torch.tensor([[False, True]], device=device)


def _score_continuations(scorer: SequenceScorer, hidden: Tensor, cache: Any, kl_rows: KLRows) -> Tensor:
    """Score ``kl_rows`` by running only their responses on top of their prompts' cached K/V.

    Row ``m`` continues the prompt of batch row ``prompt_rows[m]``, whose first ``P_m`` cached positions are
    exactly that prompt's (causal attention: a prompt's K/V never depend on what follows it). The response runs
    at positions ``P_m, P_m + 1, ...`` attending to those ``P_m`` cached entries and to itself; its first token
    is predicted from the batch row's hidden state at the prompt's last position.
    """
    ids, attention, response, rows = kl_rows[:4]
    prompt_lengths = _prompt_lengths(kl_rows)  # (M,)
    response_lengths = response.sum(-1)  # (M,)
    offsets = torch.arange(int(response_lengths.max()), device=ids.device)  # (R_max,)
    valid = offsets < response_lengths[:, None]  # (M, R_max)
    positions = prompt_lengths[:, None] + offsets  # (M, R_max) positions of the response tokens
    responses = ids.gather(1, positions.clamp(max=ids.shape[1] - 1)).masked_fill(~valid, 0)  # (M, R_max)

    prefix = int(prompt_lengths.max())
    cache.crop(prefix - cache.get_seq_length())  # keep the first P_max positions (crop takes a negative count)
    cache.batch_select_indices(rows)  # (N, ...) -> (M, ...): each KL row gets its prompt's K/V
    # Cached positions past a row's own prompt belong to its batch row's response: masked out as holes.
    prompt_mask = torch.arange(prefix, device=ids.device) < prompt_lengths[:, None]  # (M, P_max)
    out = scorer.body(
        input_ids=responses, attention_mask=torch.cat([prompt_mask, valid], 1).long(), position_ids=positions,
        cache=cache,
    ).last_hidden_state  # (M, R_max, H)
    last_prompt = hidden[rows, prompt_lengths - 1]  # (M, H) predicts each response's first token
    predictors = torch.cat([last_prompt[:, None], out[:, :-1]], 1)  # (M, R_max, H): position j predicts token j
    per_token = scorer.head_logps(predictors[valid], responses[valid])
    return sum_rows(per_token, valid)


def _prompt_lengths(kl_rows: KLRows) -> Tensor:
    """Prompt tokens of each (right-padded) row: attended tokens outside the response. # (M,)"""
    return (kl_rows.attention_mask.bool() & ~kl_rows.response_mask.bool()).sum(-1)


def _plain_kv_cache(cache: Any) -> bool:
    """Whether ``cache`` is a ``DynamicCache`` of full-attention layers only, whose positions can be cropped and
    rows selected (sliding-window, linear-attention or quantized layers keep other state)."""
    layers = getattr(cache, "layers", None)
    return isinstance(cache, DynamicCache) and bool(layers) and all(
        type(x) is DynamicLayer and getattr(x, "keys", None) is not None for x in layers
    )
