"""Robust DPO: an unbiased estimate of the DPO loss under randomly flipped preference labels."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_pref.losses.base import PreferenceLoss, logratios
from lightning_pref.registry import register_loss
from lightning_pref.types import LossOutput, SequenceLogps


@register_loss("robust")
class RobustDPOLoss(PreferenceLoss):
    r"""Robust DPO (rDPO), Chowdhury, Kini & Natarajan 2024, "Provably Robust DPO: Aligning Language Models
    with Noisy Feedback":

    .. math::
        \mathcal{L}_{rDPO} = \frac{-(1-\epsilon) \log \sigma(\beta h) + \epsilon \log \sigma(-\beta h)}{1 - 2\epsilon},
        \qquad h = \log \frac{\pi_\theta(y_w|x)}{\pi_{ref}(y_w|x)} - \log \frac{\pi_\theta(y_l|x)}{\pi_{ref}(y_l|x)}

    Symbols as in DPO; :math:`\epsilon` is the probability that a label was flipped. Unlike cDPO, which
    smooths the targets, this de-biases the loss: its expectation over the label noise equals the DPO loss on
    clean labels. It can be negative for individual pairs. :math:`\epsilon = 0` is DPO. Log-probs are summed
    over response tokens; rewards are DPO's.

    Args:
        beta: inverse temperature :math:`\beta` (> 0).
        epsilon: label-flip probability :math:`\epsilon` in ``[0, 0.5)`` (TRL's ``label_smoothing``; the paper
            suggests 0.1).
    """

    paper = "Chowdhury et al. 2024, arXiv:2403.00409 (rDPO)"

    def __init__(self, beta: float = 0.1, epsilon: float = 0.1) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"robust: beta must be > 0, got {beta}")
        if not 0 <= epsilon < 0.5:
            raise ValueError(f"robust: epsilon must be in [0, 0.5), got {epsilon}")
        self.beta = beta
        self.epsilon = epsilon

    def forward(
        self, policy: SequenceLogps, reference: SequenceLogps | None, *, kl_baseline: Tensor | None = None
    ) -> LossOutput:
        chosen_logratios, rejected_logratios = logratios(policy, reference)
        logits = self.beta * (chosen_logratios - rejected_logratios)
        eps = self.epsilon
        unbiased = -(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)  # rDPO loss ...
        losses = unbiased / (1 - 2 * eps)  # ... normalized so that its expectation under label noise is DPO's
        return LossOutput(
            losses=losses,
            chosen_rewards=self.beta * chosen_logratios.detach(),
            rejected_rewards=self.beta * rejected_logratios.detach(),
        )
