"""DPO-Positive (DPOP): DPO with a penalty for lowering the likelihood of the preferred response."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_pref import LossOutput, PreferenceLoss, SequenceLogps
from lightning_pref.losses import logratios


# No @register_loss here: the entry point ``dpop = "lp_example_loss.dpop:DPOPLoss"`` in pyproject.toml registers
# the class under the name ``dpop`` when lightning-pref loads its plugins.
class DPOPLoss(PreferenceLoss):
    r"""DPO-Positive, Pal et al. 2024, "Smaug: Fixing Failure Modes of Preference Optimisation with
    DPO-Positive", Eq. 3:

    .. math::
        \mathcal{L}_{DPOP} = -\log \sigma\Big(\beta \Big(\log \frac{\pi_\theta(y_w|x)}{\pi_{ref}(y_w|x)}
            - \log \frac{\pi_\theta(y_l|x)}{\pi_{ref}(y_l|x)}
            - \lambda \max\Big(0, \log \frac{\pi_{ref}(y_w|x)}{\pi_\theta(y_w|x)}\Big)\Big)\Big)

    In the log-ratios :math:`h_w, h_l` used by the code this is
    :math:`-\log \sigma(\beta (h_w - h_l - \lambda \max(0, -h_w)))`. DPO only asks the chosen log-ratio to
    exceed the rejected one, so it can lower the chosen response's likelihood as long as the rejected one falls
    further (the paper's failure mode on pairs that differ in a few tokens). DPOP's penalty is zero while
    :math:`\pi_\theta(y_w|x) \ge \pi_{ref}(y_w|x)` and grows once the policy falls below the reference on the
    chosen response. :math:`\lambda = 0` is DPO. Log-probs are summed over response tokens; rewards are DPO's
    :math:`\beta \log \pi_\theta(y|x) / \pi_{ref}(y|x)`.

    Args:
        beta: inverse temperature :math:`\beta` (> 0).
        dpop_lambda: penalty weight :math:`\lambda` (>= 0); the paper's experiments use 50.
    """

    paper = "Pal et al. 2024, arXiv:2402.13228, Eq. 3 (DPOP)"

    def __init__(self, beta: float = 0.1, dpop_lambda: float = 50.0) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"dpop: beta must be > 0, got {beta}")
        if dpop_lambda < 0:
            raise ValueError(f"dpop: dpop_lambda must be >= 0, got {dpop_lambda}")
        self.beta = beta
        self.dpop_lambda = dpop_lambda

    def forward(
        self, policy: SequenceLogps, reference: SequenceLogps | None, *, kl_baseline: Tensor | None = None
    ) -> LossOutput:
        chosen_logratios, rejected_logratios = logratios(policy, reference)  # h_w, h_l
        penalty = torch.clamp(-chosen_logratios, min=0)  # max(0, log pi_ref(y_w|x) / pi_theta(y_w|x))
        logits = chosen_logratios - rejected_logratios - self.dpop_lambda * penalty
        losses = -F.logsigmoid(self.beta * logits)  # Eq. 3
        return LossOutput(
            losses=losses,
            chosen_rewards=self.beta * chosen_logratios.detach(),
            rejected_rewards=self.beta * rejected_logratios.detach(),
            metrics={"dpop_penalty": penalty.detach().mean()},
        )
