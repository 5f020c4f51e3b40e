r"""Generalized advantage estimation, for PPO with a critic (as InstructGPT and the N+ PPO recipe run it)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_pref.registry import register_advantage
from lightning_pref.rl.advantages.base import AdvantageEstimator, Advantages, Reduce


@register_advantage("gae")
class GAE(AdvantageEstimator):
    r"""GAE, Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation"
    (arXiv:1506.02438), Eq. 16:

    .. math::
        \delta_t = r_t + \gamma V(s_{t+1}) - V(s_t), \qquad
        \hat A_t = \sum_{l \ge 0} (\gamma\lambda)^l \delta_{t+l}, \qquad \hat R_t = \hat A_t + V(s_t)

    :math:`r_t` the reward of emitting token :math:`t` (KL penalty, plus the score at the last token),
    :math:`V(s_t)` the critic's value before token :math:`t`, :math:`V(s_T) = 0` after the completion's last
    token (the episode ends there), :math:`\hat R_t` the return the critic regresses on. :math:`\lambda = 1`
    gives Monte-Carlo advantages, :math:`\lambda = 0` one-step TD errors.

    Args:
        gamma: discount :math:`\gamma` in [0, 1] (1 in RLHF: the score comes at the end).
        lam: :math:`\lambda` in [0, 1] (0.95 in the N+ recipe).
    """

    requires_critic = True
    paper = "Schulman et al. 2016, arXiv:1506.02438, Eq. 16"

    def __init__(self, gamma: float = 1.0, lam: float = 0.95) -> None:
        if not 0 <= gamma <= 1 or not 0 <= lam <= 1:
            raise ValueError(f"gae: gamma and lam must be in [0, 1], got {gamma}, {lam}")
        self.gamma, self.lam = gamma, lam

    def __call__(self, rewards: Tensor, mask: Tensor, group_size: int, values: Tensor | None = None,
                 reduce: Reduce | None = None) -> Advantages:
        if values is None:
            raise ValueError("gae needs the critic's values")
        mask = mask.to(rewards.dtype)
        values = values * mask
        advantages = torch.zeros_like(rewards)
        running = torch.zeros_like(rewards[:, 0])  # (N,) A_{t+1}
        for t in reversed(range(rewards.shape[1])):
            following = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)  # 0 past the end
            delta = rewards[:, t] + self.gamma * following - values[:, t]  # delta_t
            running = (delta + self.gamma * self.lam * running) * mask[:, t]  # Eq. 16, recursively
            advantages[:, t] = running
        return Advantages(advantages, (advantages + values) * mask)
