"""The interface of pairwise reward-model losses."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from lightning_pref.registry import Recorded


class RewardLoss(Recorded, nn.Module):
    """A pairwise reward-model loss: per-pair losses from the scalar scores of chosen and rejected responses.

    Register one with ``@register_reward_loss("name")`` or the ``lightning_pref.reward_losses`` entry-point
    group; ``RewardModule``'s ``model.loss`` then takes its name.

    Attributes:
        paper: citation shown by ``lightning-pref losses``.
    """

    paper: ClassVar[str] = ""
    registered_name: ClassVar[str] = ""  # set by ``register_reward_loss``

    def forward(self, chosen: Tensor, rejected: Tensor, margin: Tensor | None = None) -> Tensor:
        """Per-pair losses.

        Args:
            chosen: scores :math:`r_c = r(x, y_c)` of the chosen responses. # (B,)
            rejected: scores :math:`r_r` of the rejected responses. # (B,)
            margin: the data's per-pair margins :math:`m` (``None`` without a margin column). # (B,)

        Returns:
            Unreduced losses. # (B,)
        """
        raise NotImplementedError
