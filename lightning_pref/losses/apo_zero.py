"""Anchored Preference Optimization, APO-zero variant."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_pref.losses.base import PreferenceLoss, logratios
from lightning_pref.registry import register_loss
from lightning_pref.types import LossOutput, SequenceLogps


@register_loss("apo_zero")
class APOZeroLoss(PreferenceLoss):
    r"""APO-zero loss, D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive
    Revisions: Addressing Underspecification in Alignment", Eq. 7:

    .. math::
        \mathcal{L}_{APO\text{-}zero} = \big(1 - \sigma(\beta a)\big) + \sigma(\beta b), \qquad
        a = \log \frac{\pi_\theta(y_w|x)}{\pi_{ref}(y_w|x)}, \quad b = \log \frac{\pi_\theta(y_l|x)}{\pi_{ref}(y_l|x)}

    Symbols as in DPO. Anchored: instead of only widening the margin, it raises the chosen likelihood and lowers
    the rejected one relative to the reference, for data whose chosen responses are better than the model's
    own outputs. Log-probs are summed over response tokens; rewards are DPO's.

    Args:
        beta: inverse temperature :math:`\beta` (> 0).
    """

    paper = "D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 7"

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"apo_zero: beta must be > 0, got {beta}")
        self.beta = beta

    def forward(
        self, policy: SequenceLogps, reference: SequenceLogps | None, *, kl_baseline: Tensor | None = None
    ) -> LossOutput:
        a, b = logratios(policy, reference)
        losses = (1 - torch.sigmoid(self.beta * a)) + torch.sigmoid(self.beta * b)  # Eq. 7
        return LossOutput(
            losses=losses, chosen_rewards=self.beta * a.detach(), rejected_rewards=self.beta * b.detach()
        )
