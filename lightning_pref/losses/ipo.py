"""Identity Preference Optimization."""

from __future__ import annotations

from torch import Tensor

from lightning_pref.losses.base import PreferenceLoss, logratios
from lightning_pref.registry import register_loss
from lightning_pref.types import LossOutput, SequenceLogps


@register_loss("ipo")
class IPOLoss(PreferenceLoss):
    r"""IPO loss, Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", Eq. 17:

    .. math::
        \mathcal{L}_{IPO} = \Big(h_\pi(y_w, y_l, x) - \frac{1}{2\beta}\Big)^2, \qquad
        h_\pi = \log \frac{\pi_\theta(y_w|x)}{\pi_{ref}(y_w|x)} - \log \frac{\pi_\theta(y_l|x)}{\pi_{ref}(y_l|x)}

    Symbols as in DPO; :math:`\beta` is the paper's regularization strength :math:`\tau`. IPO regresses the
    log-ratio margin onto the target :math:`1/(2\beta)` instead of pushing it to infinity, so it does not
    overfit deterministic preferences. With ``length_normalize`` the log-probs in :math:`h_\pi` are averaged
    per response token, as TRL does and as the IPO authors confirmed they intended; without it they are summed,
    as in the original DPO repository. Rewards use summed log-probs, as for DPO.

    Args:
        beta: regularization :math:`\beta = \tau` (> 0); the target margin is :math:`1/(2\beta)`.
        length_normalize: average log-probs per response token in :math:`h_\pi` (default) instead of summing.
    """

    paper = "Azar et al. 2023, arXiv:2310.12036, Eq. 17"

    def __init__(self, beta: float = 0.1, length_normalize: bool = True) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"ipo: beta must be > 0, got {beta}")
        self.beta = beta
        self.length_normalize = length_normalize

    def forward(
        self, policy: SequenceLogps, reference: SequenceLogps | None, *, kl_baseline: Tensor | None = None
    ) -> LossOutput:
        chosen, rejected = logratios(policy, reference, mean=self.length_normalize)
        losses = (chosen - rejected - 1 / (2 * self.beta)) ** 2  # Eq. 17
        # Rewards stay on summed log-probs so they are comparable with DPO's whatever the normalization.
        chosen_logratios, rejected_logratios = logratios(policy, reference)
        return LossOutput(
            losses=losses,
            chosen_rewards=self.beta * chosen_logratios.detach(),
            rejected_rewards=self.beta * rejected_logratios.detach(),
        )
