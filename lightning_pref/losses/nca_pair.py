"""Pairwise Noise Contrastive Alignment."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_pref.losses.base import PreferenceLoss, logratios
from lightning_pref.registry import register_loss
from lightning_pref.types import LossOutput, SequenceLogps


@register_loss("nca_pair")
class NCAPairLoss(PreferenceLoss):
    r"""Pairwise NCA loss, Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit
    Rewards", NCA for preference pairs, as in TRL's ``loss_type="nca_pair"``:

    .. math::
        \mathcal{L}_{NCA} = -\log \sigma(\beta a) - \tfrac12 \log \sigma(-\beta a) - \tfrac12 \log \sigma(-\beta b),
        \qquad a = \log \frac{\pi_\theta(y_w|x)}{\pi_{ref}(y_w|x)}, \quad b = \log \frac{\pi_\theta(y_l|x)}{\pi_{ref}(y_l|x)}

    Symbols as in DPO. NCA scores each response's own reward :math:`\beta \log \pi_\theta / \pi_{ref}` rather
    than only the pair's difference: the chosen reward is driven to :math:`\log 2` (where
    :math:`\sigma = 2/3`) and the rejected one down, so unlike DPO the chosen likelihood does not fall along
    with the rejected one. Log-probs are summed over response tokens; rewards are DPO's.

    Args:
        beta: inverse temperature :math:`\beta` (> 0).
    """

    paper = "Chen et al. 2024, arXiv:2402.05369 (NCA, pairwise form as in TRL)"

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"nca_pair: beta must be > 0, got {beta}")
        self.beta = beta

    def forward(
        self, policy: SequenceLogps, reference: SequenceLogps | None, *, kl_baseline: Tensor | None = None
    ) -> LossOutput:
        a, b = logratios(policy, reference)
        chosen_rewards, rejected_rewards = self.beta * a, self.beta * b
        losses = (  # pairwise NCA loss
            -F.logsigmoid(chosen_rewards)
            - 0.5 * F.logsigmoid(-chosen_rewards)
            - 0.5 * F.logsigmoid(-rejected_rewards)
        )
        return LossOutput(
            losses=losses, chosen_rewards=chosen_rewards.detach(), rejected_rewards=rejected_rewards.detach()
        )
