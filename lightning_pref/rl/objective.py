r"""PPO's clipped objectives, and how per-token losses are aggregated into one loss.

Policy (Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv:1707.06347, Eq. 7), per token:

.. math::
    \ell^{CLIP}_t = -\min\big(\rho_t \hat A_t,\ \operatorname{clip}(\rho_t, 1 - \epsilon, 1 + \epsilon)\,\hat A_t\big),
    \qquad \rho_t = \frac{\pi_\theta(y_t)}{\pi_{\theta_{old}}(y_t)}

with :math:`\pi_{\theta_{old}}` the policy that sampled the rollout (at the sampling temperature). The value loss
clips the critic's move the same way (as OpenAI's baselines and the N+ recipe do):

.. math::
    \ell^{V}_t = \tfrac12 \max\big((V_t - \hat R_t)^2,\ (\operatorname{clip}(V_t, V^{old}_t - \epsilon_V, V^{old}_t
    + \epsilon_V) - \hat R_t)^2\big)

Aggregation (``loss_aggregation``) over a minibatch of :math:`N` completions with :math:`|y_i|` tokens each:
``token_mean`` :math:`\sum_{i,t} \ell_{i,t} / \sum_i |y_i|` (every token weighs the same; DAPO, TRL's default);
``sequence_mean`` :math:`\frac1N \sum_i \frac{1}{|y_i|}\sum_t \ell_{i,t}` (GRPO's original form);
``constant`` :math:`\sum_{i,t} \ell_{i,t} / (N \cdot L_{max})` (Dr. GRPO: no length bias). The denominators are
those of the whole minibatch on all processes, so a minibatch split into micro-batches, or over devices, gives
the gradient of the undivided one.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Aggregation = Literal["token_mean", "sequence_mean", "constant"]


def clipped_surrogate(logps: Tensor, old_logps: Tensor, advantages: Tensor, clip: float) -> tuple[Tensor, Tensor]:
    """Per-token clipped surrogate loss and the per-token ratio. # (N, L) each -> (N, L), (N, L)"""
    ratio = (logps - old_logps).exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip, 1 + clip) * advantages
    return -torch.min(unclipped, clipped), ratio  # Eq. 7


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float | None) -> Tensor:
    """Per-token value loss, with the critic's move clipped to ``clip`` around its rollout values (``None``: a plain
    squared error). # (N, L) each -> (N, L)"""
    loss = (values - returns) ** 2
    if clip is not None:
        moved = old_values + (values - old_values).clamp(-clip, clip)
        loss = torch.max(loss, (moved - returns) ** 2)
    return 0.5 * loss


def token_weights(mask: Tensor, aggregation: Aggregation, max_tokens: int, total_tokens: float,
                  total_sequences: float) -> Tensor:
    """Per-token weights that turn ``sum(weights * loss)`` into the aggregated loss of the whole minibatch.

    Args:
        mask: real tokens of this (micro-)batch. # (n, L)
        aggregation: see the module docstring.
        max_tokens: :math:`L_{max}` of ``constant`` (the most new tokens a completion may have).
        total_tokens: real tokens of the whole minibatch (every micro-batch, every process, divided by the
            number of processes when gradients are averaged over them).
        total_sequences: completions of the whole minibatch, likewise.

    Returns:
        # (n, L), 0 outside the mask
    """
    mask = mask.float()
    if aggregation == "token_mean":
        return mask / max(total_tokens, 1.0)
    if aggregation == "sequence_mean":
        return mask / mask.sum(-1, keepdim=True).clamp(min=1) / max(total_sequences, 1.0)
    if aggregation == "constant":
        return mask / (max(total_sequences, 1.0) * max_tokens)
    raise ValueError(f"model.loss_aggregation: {aggregation!r} is not one of token_mean, sequence_mean, constant")
