r"""REINFORCE++: per-token returns, normalized over the global batch."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_pref.registry import register_advantage
from lightning_pref.rl.advantages.base import AdvantageEstimator, Advantages, Reduce


@register_advantage("reinforce_pp")
class ReinforcePP(AdvantageEstimator):
    r"""REINFORCE++, Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models"
    (arXiv:2501.03262):

    .. math::
        G_t = \sum_{s \ge t} \gamma^{s - t} r_s, \qquad \hat A_t = \frac{G_t - \mu}{\sigma}

    with the KL penalty in the per-token rewards :math:`r_s`, and :math:`\mu, \sigma` the mean and standard
    deviation of :math:`G_t` over every token of the *global* batch (all completions on all processes), not per
    prompt: no critic and no groups, so one sample per prompt works.

    Args:
        gamma: discount :math:`\gamma` in [0, 1].
        eps: added to :math:`\sigma`.
    """

    paper = "Hu 2025, arXiv:2501.03262"

    def __init__(self, gamma: float = 1.0, eps: float = 1e-8) -> None:
        if not 0 <= gamma <= 1 or eps <= 0:
            raise ValueError(f"reinforce_pp: gamma must be in [0, 1] and eps > 0, got {gamma}, {eps}")
        self.gamma, self.eps = gamma, eps

    def __call__(self, rewards: Tensor, mask: Tensor, group_size: int, values: Tensor | None = None,
                 reduce: Reduce | None = None) -> Advantages:
        mask = mask.to(rewards.dtype)
        returns = torch.zeros_like(rewards)
        running = torch.zeros_like(rewards[:, 0])
        for t in reversed(range(rewards.shape[1])):
            running = (rewards[:, t] + self.gamma * running) * mask[:, t]  # G_t
            returns[:, t] = running
        stats = torch.stack([returns.sum(), (returns * returns).sum(), mask.sum()]).double()  # over real tokens
        stats = reduce(stats) if reduce is not None else stats
        mean = stats[0] / stats[2].clamp(min=1)
        std = (stats[1] / stats[2].clamp(min=1) - mean * mean).clamp(min=0).sqrt()
        advantages = ((returns - mean.to(returns.dtype)) / (std.to(returns.dtype) + self.eps)) * mask  # global
        return Advantages(advantages, returns)
