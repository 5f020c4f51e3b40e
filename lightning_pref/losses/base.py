"""The loss plugin interface every preference loss implements."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_pref.errors import UserInputError, call_plugin
from lightning_pref.registry import Recorded
from lightning_pref.types import LossOutput, SequenceLogps


def logratios(
    policy: SequenceLogps, reference: SequenceLogps | None, *, mean: bool = False
) -> tuple[Tensor, Tensor]:
    r"""Chosen and rejected log-ratios :math:`\log \pi_\theta(y|x) / \pi_{ref}(y|x)`, one per sequence.

    The reference is detached: it is frozen by definition, and detaching here keeps gradients on the policy even
    if a caller hands in reference log-probs that still carry a graph.

    Args:
        policy: log-probs of the trainable policy.
        reference: log-probs of the frozen reference.
        mean: use per-token averaged log-probs (``chosen_mean``) instead of sums.

    Raises:
        ValueError: if ``reference`` is ``None`` (the module only passes it to losses that ``requires_reference``).
    """
    if reference is None:
        raise ValueError("this loss requires reference log-probs, got reference=None")
    if mean:
        return (
            policy.chosen_mean - reference.chosen_mean.detach(),
            policy.rejected_mean - reference.rejected_mean.detach(),
        )
    return policy.chosen - reference.chosen.detach(), policy.rejected - reference.rejected.detach()


class PreferenceLoss(Recorded, nn.Module):
    """Base class of loss plugins: a pure function of per-sequence log-probs.

    A loss declares what it needs through class attributes; ``PreferenceModule`` reads these and never branches
    on a loss's name.

    Attributes:
        requires_reference: the loss reads reference log-probs; ``reference`` is ``None`` otherwise.
        paired: the loss needs chosen/rejected pairs (``policy.chosen[i]`` pairs with ``policy.rejected[i]``).
            Unpaired losses (KTO) accept different numbers of desirable and undesirable examples.
        requires_kl_baseline: the loss needs KTO's KL baseline ``z0``, estimated by the module from mismatched
            prompt/completion pairs and passed as ``kl_baseline``.
        paper: citation shown by ``lightning-pref losses``.
    """

    requires_reference: ClassVar[bool] = True
    paired: ClassVar[bool] = True
    requires_kl_baseline: ClassVar[bool] = False
    paper: ClassVar[str] = ""
    registered_name: ClassVar[str] = ""  # set by ``register_loss``

    #: Scale of the implicit reward; validation reports ``beta * (policy - reference)`` rewards with it.
    beta: float

    def forward(
        self,
        policy: SequenceLogps,
        reference: SequenceLogps | None,
        *,
        kl_baseline: Tensor | None = None,
    ) -> LossOutput:
        """Compute per-example losses and implicit rewards.

        Args:
            policy: log-probs of the trainable policy.
            reference: log-probs of the frozen reference, or ``None`` for reference-free losses.
            kl_baseline: KTO's detached scalar ``z0`` when ``requires_kl_baseline`` is set.

        Returns:
            Unreduced losses, detached rewards and optional extra metrics.
        """
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_") and k != "training")


def checked_call(loss: PreferenceLoss, policy: SequenceLogps, reference: SequenceLogps | None,
                 kl_baseline: Tensor | None) -> LossOutput:
    """``loss(policy, reference, kl_baseline=...)``, its output held to the contract where it enters training: a
    :class:`LossOutput` with one loss per pair (or per example, unpaired), a reward per chosen and per rejected
    sequence, and losses that depend on the policy while gradients are on. A plugin breaking it was a traceback
    deep in the metrics or the backward, or (rewards of the wrong length) wrong metrics, exit 0.

    Raises:
        UserInputError: naming the loss and what it returned, or what it raised and where (a ``ValueError``, the
            loss's own refusal, by its message alone).
    """
    name = f"model.loss: {type(loss).__name__}"
    out = call_plugin(f"{name}.forward", "fix the loss", loss, policy, reference, kl_baseline=kl_baseline,
                      refusal=name)
    if not isinstance(out, LossOutput):
        raise UserInputError(f"{name}.forward returned a {type(out).__name__}; a loss returns a LossOutput (losses, "
                             "chosen_rewards, rejected_rewards, metrics)")
    for field in ("losses", "chosen_rewards", "rejected_rewards"):
        if not isinstance(getattr(out, field), Tensor):
            raise UserInputError(f"{name} returned {field} as a {type(getattr(out, field)).__name__}; a LossOutput "
                                 "holds tensors")
    pairs, sequences = len(policy.chosen), len(policy.chosen) + len(policy.rejected)
    if out.losses.ndim != 1 or len(out.losses) not in (pairs, sequences):
        raise UserInputError(f"{name} returned losses of shape {tuple(out.losses.shape)}; one per pair ({pairs}) or, "
                             f"unpaired, per example ({sequences}), unreduced (the module takes their mean)")
    for side, rewards, expected in (("chosen", out.chosen_rewards, pairs), ("rejected", out.rejected_rewards,
                                                                           len(policy.rejected))):
        if tuple(rewards.shape) != (expected,):
            raise UserInputError(f"{name} returned {side}_rewards of shape {tuple(rewards.shape)}; one per {side} "
                                 f"sequence ({expected}) expected")
    if torch.is_grad_enabled() and policy.chosen.requires_grad and not out.losses.requires_grad:
        raise UserInputError(f"{name} returned losses that do not depend on the policy's log-probs (detached?), so "
                             "nothing would be learnt")
    rewards = torch.cat([out.chosen_rewards.detach().float(), out.rejected_rewards.detach().float()])
    if bool(out.losses.detach().isfinite().all()) and not bool(rewards.isfinite().all()):  # a non-finite loss
        # is the module's to handle (model.on_nonfinite); rewards enter only the metrics, NaN as a silent 0
        raise UserInputError(f"{name} returned non-finite rewards ({rewards[~rewards.isfinite()][0].item()}) with "
                             "finite losses; the rewards are its implicit rewards, reported as metrics: fix the loss")
    for key, value in out.metrics.items():
        if isinstance(value, Tensor) and value.numel() != 1:
            raise UserInputError(f"{name} returned metrics[{key!r}] of shape {tuple(value.shape)}; a metric is one "
                                 "number (the module logs its mean over examples and devices)")
    return out
