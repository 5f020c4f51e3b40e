"""Hinge loss on the reference-normalized likelihood margin (SLiC-HF / RSO)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_pref.losses.base import PreferenceLoss, logratios
from lightning_pref.registry import register_loss
from lightning_pref.types import LossOutput, SequenceLogps


@register_loss("hinge")
class HingeLoss(PreferenceLoss):
    r"""Hinge loss of SLiC-HF, Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human
    Feedback", in the reference-normalized form of RSO, Liu et al. 2023, "Statistical Rejection Sampling
    Improves Preference Optimization" (``hinge-norm``; TRL's ``loss_type="hinge"``):

    .. math::
        \mathcal{L}_{hinge} = \max\big(0,\; 1 - \beta h\big), \qquad
        h = \log \frac{\pi_\theta(y_w|x)}{\pi_{ref}(y_w|x)} - \log \frac{\pi_\theta(y_l|x)}{\pi_{ref}(y_l|x)}

    Symbols as in DPO. This is :math:`\beta` times SLiC's calibration loss :math:`\max(0, \delta - \log
    \pi_\theta(y_w|x) + \log \pi_\theta(y_l|x))` with margin :math:`\delta = 1/\beta` and log-probs normalized
    by the reference. Pairs whose margin already exceeds :math:`1/\beta` contribute neither loss nor gradient.
    Log-probs are summed over response tokens; rewards are DPO's.

    Args:
        beta: inverse margin :math:`\beta` (> 0); pairs are pushed to :math:`h \ge 1/\beta`.
    """

    paper = "Zhao et al. 2023, arXiv:2305.10425 (SLiC-HF); Liu et al. 2023, arXiv:2309.06657 (RSO hinge-norm)"

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"hinge: beta must be > 0, got {beta}")
        self.beta = beta

    def forward(
        self, policy: SequenceLogps, reference: SequenceLogps | None, *, kl_baseline: Tensor | None = None
    ) -> LossOutput:
        chosen_logratios, rejected_logratios = logratios(policy, reference)
        losses = torch.relu(1 - self.beta * (chosen_logratios - rejected_logratios))  # hinge-norm loss
        return LossOutput(
            losses=losses,
            chosen_rewards=self.beta * chosen_logratios.detach(),
            rejected_rewards=self.beta * rejected_logratios.detach(),
        )
