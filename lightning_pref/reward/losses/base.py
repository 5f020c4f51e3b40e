"""The interface of pairwise reward-model losses."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_pref.errors import UserInputError, call_plugin
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


def checked_call(loss: RewardLoss, chosen: Tensor, rejected: Tensor, margin: Tensor | None) -> Tensor:
    """``loss(chosen, rejected, margin)``, held to the contract where it enters training: one loss per pair that
    depends on the scores while gradients are on. A plugin breaking it trained another objective (a ``(B, B)``
    matrix by a broadcasting slip, or a mean), exit 0, or was a traceback in the backward.

    Raises:
        UserInputError: naming the loss and what it returned or raised.
    """
    name = f"model.loss: {type(loss).__name__}"
    losses = call_plugin(f"{name}.forward", "fix the loss", loss, chosen, rejected, margin)
    if not isinstance(losses, Tensor) or tuple(losses.shape) != tuple(chosen.shape):
        got = f"shape {tuple(losses.shape)}" if isinstance(losses, Tensor) else f"a {type(losses).__name__}"
        raise UserInputError(f"{name} returned {got}; a reward loss returns one loss per pair {tuple(chosen.shape)}, "
                             "unreduced (the module takes their mean)")
    if torch.is_grad_enabled() and chosen.requires_grad and not losses.requires_grad:
        raise UserInputError(f"{name} returned losses that do not depend on the scores (detached?), so nothing "
                             "would be learnt")
    return losses
