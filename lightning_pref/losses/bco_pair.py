"""Pairwise Binary Classifier Optimization."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_pref.losses.base import PreferenceLoss, logratios
from lightning_pref.registry import register_loss
from lightning_pref.types import LossOutput, SequenceLogps


@register_loss("bco_pair")
class BCOPairLoss(PreferenceLoss):
    r"""Paired BCO loss, Jung et al. 2024, "Binary Classifier Optimization for Large Language Model
    Alignment", as in TRL's ``DPOTrainer(loss_type="bco_pair")``:

    .. math::
        \mathcal{L}_{BCO} = -\log \sigma(r_w - \delta) - \log \sigma\big(-(r_l - \delta)\big), \qquad
        r = \beta \log \frac{\pi_\theta(y|x)}{\pi_{ref}(y|x)}

    Symbols as in DPO; :math:`\delta` is the reward shift, the running mean of the batch-mean reward
    :math:`\mathrm{mean}(r_w, r_l)`: BCO trains a binary classifier with logit :math:`r - \delta` that labels
    chosen responses 1 and rejected ones 0. :math:`\delta` lives in the buffer ``reward_shift`` (saved in
    checkpoints) and is updated under ``no_grad`` in training mode only, before it is used, so the first
    training batch is shifted by its own mean; evaluation uses the value reached in training. Each training
    forward counts as one step, equally weighted (TRL also gathers the batch mean across processes; here DDP's
    buffer broadcast makes every rank use rank 0's shift). Log-probs are summed over response tokens.

    Args:
        beta: inverse temperature :math:`\beta` (> 0).
    """

    paper = "Jung et al. 2024, arXiv:2404.04656 (BCO, paired form as in TRL)"

    reward_shift: Tensor
    reward_shift_count: Tensor

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"bco_pair: beta must be > 0, got {beta}")
        self.beta = beta
        self.register_buffer("reward_shift", torch.zeros(()))
        # An integer count stays exact when the module is cast with .to(dtype).
        self.register_buffer("reward_shift_count", torch.zeros((), dtype=torch.long))

    def forward(
        self, policy: SequenceLogps, reference: SequenceLogps | None, *, kl_baseline: Tensor | None = None
    ) -> LossOutput:
        chosen_logratios, rejected_logratios = logratios(policy, reference)
        chosen_rewards = self.beta * chosen_logratios
        rejected_rewards = self.beta * rejected_logratios
        if self.training:
            with torch.no_grad():
                batch_mean = torch.cat([chosen_rewards, rejected_rewards]).mean()
                self.reward_shift_count += 1
                self.reward_shift += (batch_mean - self.reward_shift) / self.reward_shift_count
        delta = self.reward_shift.to(chosen_rewards.dtype)
        losses = -F.logsigmoid(chosen_rewards - delta) - F.logsigmoid(-(rejected_rewards - delta))  # BCO loss
        return LossOutput(
            losses=losses, chosen_rewards=chosen_rewards.detach(), rejected_rewards=rejected_rewards.detach()
        )
