"""Negative log-likelihood of the chosen response: the SFT term, e.g. of RPO."""

from __future__ import annotations

from torch import Tensor

from lightning_pref.losses.base import PreferenceLoss
from lightning_pref.registry import register_loss
from lightning_pref.types import LossOutput, SequenceLogps


@register_loss("nll")
class NLLLoss(PreferenceLoss):
    r"""Per-token negative log-likelihood of the chosen (desirable) responses, the supervised fine-tuning loss:

    .. math::
        \mathcal{L}_{NLL} = -\frac{1}{|y_w|} \log \pi_\theta(y_w|x)

    Symbols: :math:`y_w` a chosen response, :math:`|y_w|` its number of response tokens. On its own it is SFT
    on the chosen responses; combined with DPO through :class:`~lightning_pref.losses.WeightedLoss` as
    ``dpo + alpha * nll`` it is RPO, Pang et al. 2024, "Iterative Reasoning Preference Optimization" (the DPO+NLL
    loss, whose NLL term is length-normalized like this one; TRL's ``rpo_alpha``). Rejected responses are
    ignored, so ``paired = False``: the losses have shape ``(B_chosen,)``, one per chosen response, for paired
    and unpaired batches alike. No reference model, no :math:`\beta`. Rewards: the mean log-probs
    :math:`\frac{1}{|y|} \log \pi_\theta(y|x)` of both halves.
    """

    requires_reference = False
    paired = False
    paper = "Pang et al. 2024, arXiv:2404.19733 (NLL term of RPO's DPO+NLL loss); standard SFT objective"

    def forward(
        self, policy: SequenceLogps, reference: SequenceLogps | None, *, kl_baseline: Tensor | None = None
    ) -> LossOutput:
        return LossOutput(
            losses=-policy.chosen_mean,  # L_NLL
            chosen_rewards=policy.chosen_mean.detach(),
            rejected_rewards=policy.rejected_mean.detach(),
        )
