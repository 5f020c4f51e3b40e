"""Simple Preference Optimization: a reference-free, length-normalized DPO variant."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_pref.losses.base import PreferenceLoss
from lightning_pref.registry import register_loss
from lightning_pref.types import LossOutput, SequenceLogps


@register_loss("simpo")
class SimPOLoss(PreferenceLoss):
    r"""SimPO loss, Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward", Eq. 6:

    .. math::
        \mathcal{L}_{SimPO} = -\log \sigma\Big(\frac{\beta}{|y_w|} \log \pi_\theta(y_w|x)
                                              - \frac{\beta}{|y_l|} \log \pi_\theta(y_l|x) - \gamma\Big)

    Symbols: :math:`|y|` the number of response tokens, so :math:`\frac{1}{|y|}\log \pi_\theta(y|x)` is the
    per-token average log-prob; :math:`\gamma` the target reward margin. No reference model. Implicit reward
    (Eq. 4): :math:`r = \frac{\beta}{|y|} \log \pi_\theta(y|x)`.

    Defaults follow the authors' recommendations: the paper trains with :math:`\beta \in \{2.0, 2.5\}`, and the
    official repository's README advises starting from :math:`\gamma/\beta = 0.5` (tuned in ``[0, 1]``).
    :math:`\beta = 2.0, \gamma = 1.0` is that starting point and the released Llama-3-Base setting. SimPO needs a
    much larger :math:`\beta` than DPO's 0.1 because its log-probs are per-token averages.

    Args:
        beta: reward scale :math:`\beta` (> 0).
        gamma: target reward margin :math:`\gamma` (>= 0), in reward units (TRL's ``simpo_gamma``; the SimPO
            repository's ``gamma_beta_ratio`` times ``beta``).
    """

    requires_reference = False
    paper = "Meng et al. 2024, arXiv:2405.14734, Eq. 6"

    def __init__(self, beta: float = 2.0, gamma: float = 1.0) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"simpo: beta must be > 0, got {beta}")
        if gamma < 0:
            raise ValueError(f"simpo: gamma must be >= 0, got {gamma}")
        self.beta = beta
        self.gamma = gamma

    def forward(
        self, policy: SequenceLogps, reference: SequenceLogps | None, *, kl_baseline: Tensor | None = None
    ) -> LossOutput:
        chosen_rewards = self.beta * policy.chosen_mean  # Eq. 4
        rejected_rewards = self.beta * policy.rejected_mean
        losses = -F.logsigmoid(chosen_rewards - rejected_rewards - self.gamma)  # Eq. 6
        return LossOutput(
            losses=losses, chosen_rewards=chosen_rewards.detach(), rejected_rewards=rejected_rewards.detach()
        )
