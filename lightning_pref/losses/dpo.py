"""Direct Preference Optimization."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_pref.losses.base import PreferenceLoss, logratios
from lightning_pref.registry import register_loss
from lightning_pref.types import LossOutput, SequenceLogps


@register_loss("dpo")
class DPOLoss(PreferenceLoss):
    r"""DPO loss, Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
    Reward Model", Eq. 7:

    .. math::
        \mathcal{L}_{DPO} = -\log \sigma\Big(\beta \log \frac{\pi_\theta(y_w|x)}{\pi_{ref}(y_w|x)}
                                            - \beta \log \frac{\pi_\theta(y_l|x)}{\pi_{ref}(y_l|x)}\Big)

    Symbols: :math:`y_w` chosen, :math:`y_l` rejected response, :math:`\pi_\theta` policy, :math:`\pi_{ref}`
    reference, :math:`\beta` strength of the implicit KL constraint. Log-probs are summed over response tokens.
    Implicit rewards (Eq. 5): :math:`r = \beta \log \pi_\theta(y|x) / \pi_{ref}(y|x)`.

    Args:
        beta: inverse temperature :math:`\beta` (> 0).
    """

    paper = "Rafailov et al. 2023, arXiv:2305.18290, Eq. 7"

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"dpo: beta must be > 0, got {beta}")
        self.beta = beta

    def forward(
        self, policy: SequenceLogps, reference: SequenceLogps | None, *, kl_baseline: Tensor | None = None
    ) -> LossOutput:
        chosen_logratios, rejected_logratios = logratios(policy, reference)  # log pi(y|x)/pi_ref(y|x)
        losses = -F.logsigmoid(self.beta * (chosen_logratios - rejected_logratios))  # Eq. 7
        return LossOutput(
            losses=losses,
            chosen_rewards=self.beta * chosen_logratios.detach(),  # Eq. 5
            rejected_rewards=self.beta * rejected_logratios.detach(),
        )
