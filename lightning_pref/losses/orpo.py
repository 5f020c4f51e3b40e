"""Odds Ratio Preference Optimization: SFT plus an odds-ratio penalty, without a reference model."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_pref.losses.base import PreferenceLoss
from lightning_pref.registry import register_loss
from lightning_pref.types import LossOutput, SequenceLogps


def _log_odds(mean_logps: Tensor) -> Tensor:
    r""":math:`\log \frac{p}{1-p}` for :math:`p = \exp(\bar a)`, computed without cancellation.

    :math:`\log(1 - e^{a})` uses ``log(-expm1(a))`` near 0 and ``log1p(-exp(a))`` below :math:`-\log 2`
    (Maechler 2012). A mean log-prob of exactly 0 (every token certain) would give infinite odds, so it is capped
    just below 0, where the gradient is meaningless anyway.
    """
    a = mean_logps.clamp(max=-1e-6)
    log1mexp = torch.where(a > -math.log(2), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))
    return a - log1mexp


@register_loss("orpo")
class ORPOLoss(PreferenceLoss):
    r"""ORPO loss, Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    Eqs. 6-7:

    .. math::
        \mathcal{L}_{ORPO} = \underbrace{-\bar a_w}_{\mathcal{L}_{SFT}}
            - \lambda \log \sigma\Big(\log \frac{\mathrm{odds}_\theta(y_w|x)}{\mathrm{odds}_\theta(y_l|x)}\Big),
        \qquad \mathrm{odds}_\theta(y|x) = \frac{P_\theta(y|x)}{1 - P_\theta(y|x)}, \quad P_\theta = e^{\bar a}

    Symbols: :math:`\bar a = \frac{1}{|y|} \log \pi_\theta(y|x)` the per-token average log-prob of a response,
    :math:`\lambda` the weight of the odds-ratio term. No reference model. Rewards, as in TRL:
    :math:`\lambda \bar a`. The SFT term is each chosen response's mean token NLL (TRL averages over all
    tokens of the batch instead).

    Args:
        beta: odds-ratio weight :math:`\lambda` (> 0); called ``beta`` as in TRL's ``ORPOConfig``.
    """

    requires_reference = False
    paper = "Hong et al. 2024, arXiv:2403.07691, Eqs. 6-7"

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"orpo: beta must be > 0, got {beta}")
        self.beta = beta

    def forward(
        self, policy: SequenceLogps, reference: SequenceLogps | None, *, kl_baseline: Tensor | None = None
    ) -> LossOutput:
        chosen, rejected = policy.chosen_mean, policy.rejected_mean
        odds_ratio_loss = -F.logsigmoid(_log_odds(chosen) - _log_odds(rejected))  # Eq. 7
        losses = -chosen + self.beta * odds_ratio_loss  # Eq. 6
        return LossOutput(
            losses=losses,
            chosen_rewards=self.beta * chosen.detach(),
            rejected_rewards=self.beta * rejected.detach(),
        )
