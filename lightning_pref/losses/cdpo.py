"""Conservative DPO: DPO with label smoothing for noisy preference labels."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_pref.losses.base import PreferenceLoss, logratios
from lightning_pref.registry import register_loss
from lightning_pref.types import LossOutput, SequenceLogps


@register_loss("cdpo")
class CDPOLoss(PreferenceLoss):
    r"""Conservative DPO (cDPO), Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO"
    (the ``label_smoothing`` option of the reference DPO implementation; the note's loss is unnumbered):

    .. math::
        \mathcal{L}_{cDPO} = -(1-\epsilon) \log \sigma(\beta h) - \epsilon \log \sigma(-\beta h),
        \qquad h = \log \frac{\pi_\theta(y_w|x)}{\pi_{ref}(y_w|x)} - \log \frac{\pi_\theta(y_l|x)}{\pi_{ref}(y_l|x)}

    Symbols as in DPO (Rafailov et al. 2023, Eq. 7); :math:`\epsilon` is the assumed probability that a
    preference label is flipped. This is DPO's cross-entropy against soft targets :math:`(1-\epsilon, \epsilon)`:
    its gradient vanishes at the finite margin :math:`\sigma(\beta h) = 1 - \epsilon`, so the log-ratios stop
    growing instead of diverging as in DPO. :math:`\epsilon = 0` is DPO. Log-probs are summed over response
    tokens; rewards are DPO's :math:`\beta \log \pi_\theta(y|x) / \pi_{ref}(y|x)`.

    Args:
        beta: inverse temperature :math:`\beta` (> 0).
        epsilon: label-flip probability :math:`\epsilon` in ``[0, 0.5)`` (TRL's ``label_smoothing``).
    """

    paper = "Mitchell 2023, 'A note on DPO with noisy preferences & relationship to IPO' (cDPO)"

    def __init__(self, beta: float = 0.1, epsilon: float = 0.1) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"cdpo: beta must be > 0, got {beta}")
        if not 0 <= epsilon < 0.5:
            raise ValueError(f"cdpo: epsilon must be in [0, 0.5), got {epsilon}")
        self.beta = beta
        self.epsilon = epsilon

    def forward(
        self, policy: SequenceLogps, reference: SequenceLogps | None, *, kl_baseline: Tensor | None = None
    ) -> LossOutput:
        chosen_logratios, rejected_logratios = logratios(policy, reference)
        logits, eps = self.beta * (chosen_logratios - rejected_logratios), self.epsilon
        losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)  # cDPO loss
        return LossOutput(
            losses=losses,
            chosen_rewards=self.beta * chosen_logratios.detach(),
            rejected_rewards=self.beta * rejected_logratios.detach(),
        )
