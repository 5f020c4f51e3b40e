"""Bradley–Terry with a centering regularizer."""

from __future__ import annotations

from torch import Tensor

from lightning_pref.registry import register_reward_loss
from lightning_pref.reward.losses.bradley_terry import BradleyTerryLoss


@register_reward_loss("centered_bradley_terry")
class CenteredBradleyTerryLoss(BradleyTerryLoss):
    r"""Bradley–Terry plus a centering term that pins the scores' offset, which the pairwise likelihood leaves
    free (Eisenstein et al. 2023, "Helping or Herding? Reward Model Ensembles Mitigate but do not Eliminate
    Reward Hacking", §3, the *centering* loss):

    .. math::
        \mathcal{L} = -\log \sigma\big(r_c - r_r - m\big) + \eta \, (r_c + r_r)^2

    Symbols as in :class:`BradleyTerryLoss`; :math:`\eta` the regularization strength. Without it a reward
    model can drift to any constant offset (only differences are trained), which makes scores of different
    models or checkpoints incomparable and mean-based normalization brittle.

    Args:
        eta: the regularization strength :math:`\eta` (>= 0).
        use_margin: subtract the data's per-pair margin.
    """

    paper = "Eisenstein et al. 2023, arXiv:2312.09244, §3 (centering); Ouyang et al. 2022, Eq. 1"

    def __init__(self, eta: float = 0.01, use_margin: bool = True) -> None:
        super().__init__(use_margin)
        if eta < 0:
            raise ValueError(f"centered_bradley_terry: eta must be >= 0, got {eta}")
        self.eta = eta

    def forward(self, chosen: Tensor, rejected: Tensor, margin: Tensor | None = None) -> Tensor:
        return super().forward(chosen, rejected, margin) + self.eta * (chosen + rejected) ** 2  # (B,)
