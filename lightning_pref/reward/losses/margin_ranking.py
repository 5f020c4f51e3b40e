"""The hinge (margin ranking) reward-model loss."""

from __future__ import annotations

from torch import Tensor

from lightning_pref.registry import register_reward_loss
from lightning_pref.reward.losses.base import RewardLoss


@register_reward_loss("margin_ranking")
class MarginRankingLoss(RewardLoss):
    r"""Hinge loss on the score difference, the ranking loss of torch's ``MarginRankingLoss`` (a margin
    alternative to the logistic Bradley–Terry loss for learning a scoring function from pairs):

    .. math::
        \mathcal{L} = \max\big(0,\; \delta + m - (r_c - r_r)\big)

    Symbols as in :class:`BradleyTerryLoss`; :math:`\delta` the required gap. Pairs already separated by
    :math:`\delta + m` contribute nothing (unlike Bradley–Terry, which keeps pushing).

    Args:
        delta: the required gap :math:`\delta` (> 0).
        use_margin: add the data's per-pair margin to the gap.
    """

    paper = "hinge ranking loss (torch.nn.MarginRankingLoss)"

    def __init__(self, delta: float = 1.0, use_margin: bool = True) -> None:
        super().__init__()
        if delta <= 0:
            raise ValueError(f"margin_ranking: delta must be > 0, got {delta}")
        self.delta, self.use_margin = delta, use_margin

    def forward(self, chosen: Tensor, rejected: Tensor, margin: Tensor | None = None) -> Tensor:
        gap = self.delta + (margin if self.use_margin and margin is not None else 0.0)
        return (gap - (chosen - rejected)).clamp(min=0)  # (B,)
