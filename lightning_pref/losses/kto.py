"""Kahneman-Tversky Optimization: alignment from unpaired desirable/undesirable examples."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_pref.losses.base import PreferenceLoss, logratios
from lightning_pref.registry import register_loss
from lightning_pref.types import LossOutput, SequenceLogps


@register_loss("kto")
class KTOLoss(PreferenceLoss):
    r"""KTO loss, Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", Eq. 8:

    .. math::
        \mathcal{L}_{KTO} = \mathbb{E}_{x,y}\big[\lambda_y - v(x, y)\big], \qquad
        v(x, y) = \begin{cases}
            \lambda_D \, \sigma\big(\beta (r_\theta(x, y) - z_0)\big) & y \text{ desirable} \\
            \lambda_U \, \sigma\big(\beta (z_0 - r_\theta(x, y))\big) & y \text{ undesirable}
        \end{cases}

    Symbols: :math:`r_\theta = \log \pi_\theta(y|x) / \pi_{ref}(y|x)` with log-probs summed over response
    tokens, :math:`z_0` the reference point, an estimate of :math:`\mathrm{KL}(\pi_\theta \| \pi_{ref})` that
    ``PreferenceModule`` computes from mismatched prompt/completion pairs, detaches and clamps at 0, and passes
    as ``kl_baseline``; :math:`\lambda_D, \lambda_U` weight desirable and undesirable examples (the paper
    recommends :math:`\lambda_D n_D / (\lambda_U n_U) \in [1, 4/3]`). Unpaired: ``policy.chosen`` holds the
    desirable and ``policy.rejected`` the undesirable examples, in any numbers (either may be empty); the
    losses are ``cat(desirable, undesirable)``. Rewards: :math:`\beta r_\theta`.

    Args:
        beta: inverse temperature :math:`\beta` (> 0).
        desirable_weight: :math:`\lambda_D` (>= 0).
        undesirable_weight: :math:`\lambda_U` (>= 0).
    """

    paired = False
    requires_kl_baseline = True
    paper = "Ethayarajh et al. 2024, arXiv:2402.01306, Eq. 8"

    def __init__(
        self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
    ) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"kto: beta must be > 0, got {beta}")
        if desirable_weight < 0:
            raise ValueError(f"kto: desirable_weight must be >= 0, got {desirable_weight}")
        if undesirable_weight < 0:
            raise ValueError(f"kto: undesirable_weight must be >= 0, got {undesirable_weight}")
        if desirable_weight == undesirable_weight == 0:
            raise ValueError("kto: desirable_weight and undesirable_weight are both 0, so the loss is 0 and nothing "
                             "is learnt; give one of them a weight > 0")
        self.beta = beta
        self.desirable_weight = desirable_weight
        self.undesirable_weight = undesirable_weight

    def forward(
        self, policy: SequenceLogps, reference: SequenceLogps | None, *, kl_baseline: Tensor | None = None
    ) -> LossOutput:
        if kl_baseline is None:
            raise ValueError(
                "kto: kl_baseline (the KL reference point z0) is required; PreferenceModule estimates it from "
                "mismatched prompt/completion pairs because KTOLoss.requires_kl_baseline is True"
            )
        z0 = kl_baseline.detach()  # a baseline, not a path for gradients
        desirable, undesirable = logratios(policy, reference)
        losses = torch.cat(  # Eq. 8: lambda_y - v(x, y)
            [
                self.desirable_weight * (1 - torch.sigmoid(self.beta * (desirable - z0))),
                self.undesirable_weight * (1 - torch.sigmoid(self.beta * (z0 - undesirable))),
            ]
        )
        return LossOutput(
            losses=losses,
            chosen_rewards=self.beta * desirable.detach(),
            rejected_rewards=self.beta * undesirable.detach(),
            metrics={"kl": z0},
        )
