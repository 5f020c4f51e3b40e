"""The Bradley–Terry reward-model loss."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_pref.registry import register_reward_loss
from lightning_pref.reward.losses.base import RewardLoss


@register_reward_loss("bradley_terry")
class BradleyTerryLoss(RewardLoss):
    r"""Bradley–Terry negative log-likelihood, as fitted for InstructGPT's reward model (Ouyang et al. 2022,
    Eq. 1) and, with a margin, for Llama 2's (Touvron et al. 2023, Eq. 2):

    .. math::
        \mathcal{L} = -\log \sigma\big(r(x, y_c) - r(x, y_r) - m(r)\big)

    Symbols: :math:`r(x, y)` the scalar score of response :math:`y` to prompt :math:`x` (the score at the last
    real token), :math:`y_c` / :math:`y_r` the chosen / rejected response, :math:`\sigma` the logistic function,
    so :math:`\Pr(y_c \succ y_r) = \sigma(r_c - r_r)`; :math:`m(r) \ge 0` the pair's margin from the data's
    ``margin`` column (Llama 2: larger for pairs rated "significantly better"), 0 without one.

    Args:
        use_margin: subtract the data's per-pair margin (when the batch carries one).
    """

    paper = "Ouyang et al. 2022, arXiv:2203.02155, Eq. 1; margin: Touvron et al. 2023, arXiv:2307.09288, Eq. 2"

    def __init__(self, use_margin: bool = True) -> None:
        super().__init__()
        self.use_margin = use_margin

    def forward(self, chosen: Tensor, rejected: Tensor, margin: Tensor | None = None) -> Tensor:
        difference = chosen - rejected  # (B,)
        if self.use_margin and margin is not None:
            difference = difference - margin
        return -F.logsigmoid(difference)  # Eq. 1 / Eq. 2
