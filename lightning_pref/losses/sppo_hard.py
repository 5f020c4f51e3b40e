"""Self-Play Preference Optimization with hard (0/1) win probabilities."""

from __future__ import annotations

from torch import Tensor

from lightning_pref.losses.base import PreferenceLoss, logratios
from lightning_pref.registry import register_loss
from lightning_pref.types import LossOutput, SequenceLogps


@register_loss("sppo_hard")
class SPPOHardLoss(PreferenceLoss):
    r"""SPPO loss with hard labels, Wu et al. 2024, "Self-Play Preference Optimization for Language Model
    Alignment", Eq. 4.7 (Algorithm 1) with :math:`\hat P(y_w \succ \pi) = 1` and :math:`\hat P(y_l \succ \pi) = 0`,
    as in TRL's ``loss_type="sppo_hard"``:

    .. math::
        \mathcal{L}_{SPPO} = \Big(a - \frac{1}{2\beta}\Big)^2 + \Big(b + \frac{1}{2\beta}\Big)^2, \qquad
        a = \log \frac{\pi_\theta(y_w|x)}{\pi_{ref}(y_w|x)}, \quad b = \log \frac{\pi_\theta(y_l|x)}{\pi_{ref}(y_l|x)}

    Symbols as in DPO; :math:`1/\beta` is the paper's :math:`\eta` and :math:`\pi_{ref}` its previous-iteration
    policy :math:`\pi_t`. Unlike IPO it regresses each log-ratio separately: the chosen one onto
    :math:`+1/(2\beta)` and the rejected one onto :math:`-1/(2\beta)`. The paper estimates :math:`\hat P` softly
    with a preference model; the hard version needs only the labels. Log-probs are summed over response tokens;
    rewards are DPO's.

    Args:
        beta: inverse step size :math:`\beta = 1/\eta` (> 0).
    """

    paper = "Wu et al. 2024, arXiv:2405.00675, Eq. 4.7 (hard labels)"

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"sppo_hard: beta must be > 0, got {beta}")
        self.beta = beta

    def forward(
        self, policy: SequenceLogps, reference: SequenceLogps | None, *, kl_baseline: Tensor | None = None
    ) -> LossOutput:
        a, b = logratios(policy, reference)
        target = 1 / (2 * self.beta)
        losses = (a - target) ** 2 + (b + target) ** 2  # Eq. 4.7 with P = 1 (winner), 0 (loser)
        return LossOutput(
            losses=losses, chosen_rewards=self.beta * a.detach(), rejected_rewards=self.beta * b.detach()
        )
