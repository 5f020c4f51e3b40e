"""The advantage-estimator interface: per-token rewards of a rollout in, per-token advantages (and the returns a
critic regresses on) out."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, NamedTuple

from torch import Tensor

from lightning_pref.errors import UserInputError, call_plugin
from lightning_pref.registry import Recorded

#: Sums a tensor over every process (the identity on one process): estimators that normalize over the global
#: batch (REINFORCE++) use it so that every rank normalizes with the same statistics.
Reduce = Callable[[Tensor], Tensor]


class Advantages(NamedTuple):
    """What an estimator returns, laid out like the rewards."""

    advantages: Tensor  # (N, L) 0 outside the mask
    returns: Tensor  # (N, L) what a critic regresses on (advantages + values for GAE); 0 outside the mask


class AdvantageEstimator(Recorded):
    """Turns a rollout's per-token rewards into per-token advantages.

    A rollout holds ``N = B * k`` completions, prompt-major (rows ``g*k ... g*k + k - 1`` answer prompt ``g``),
    right-aligned at their first token: column ``t`` is the completion's ``t``-th token, ``mask`` marks real
    tokens. ``rewards[n, t]`` is the reward of emitting token ``t``: the KL penalty at every token and the
    judge's score added at the completion's last token (its stop token). Estimators are pure functions of these
    tensors; one small file each, whose docstring gives the paper and the equation.

    Attributes:
        requires_critic: needs the critic's values ``V(s_t)`` (GAE); a critic-free estimator gets ``None``.
        requires_groups: compares the ``k`` completions of a prompt, so needs ``k >= 2``.
        paper: citation shown by ``lightning-pref`` listings.
    """

    requires_critic: ClassVar[bool] = False
    requires_groups: ClassVar[bool] = False
    paper: ClassVar[str] = ""
    registered_name: ClassVar[str] = ""  # set by ``register_advantage``

    def __call__(self, rewards: Tensor, mask: Tensor, group_size: int, values: Tensor | None = None,
                 reduce: Reduce | None = None) -> Advantages:
        """Per-token advantages of a rollout.

        Args:
            rewards: per-token rewards. # (N, L)
            mask: True on real completion tokens. # (N, L)
            group_size: ``k``, completions per prompt (rows are prompt-major).
            values: the critic's ``V(s_t)`` at each token (``requires_critic``). # (N, L)
            reduce: sums over processes, for statistics of the global batch (``None``: this process only).
        """
        raise NotImplementedError


def checked_call(estimator: AdvantageEstimator, rewards: Tensor, mask: Tensor, group_size: int,
                 values: Tensor | None, reduce: Reduce | None) -> Advantages:
    """``estimator(rewards, mask, group_size, values, reduce)``, held to the contract where it enters training:
    :class:`Advantages` of finite per-token tensors laid out like the rewards. Per-sequence advantages ``(N,)``
    broadcast along the tokens (completion ``j``'s advantage given to token ``j`` of every completion) trained
    with exit 0; other mistakes were tracebacks in the policy loss, and NaN a "non-finite loss" blamed on data.

    Raises:
        UserInputError: naming the estimator and what it returned or raised.
    """
    name = f"model.estimator: {type(estimator).__name__}"
    out = call_plugin(f"{name}.__call__", "fix the estimator", estimator, rewards, mask, group_size, values, reduce)
    if not isinstance(out, Advantages):
        raise UserInputError(f"{name} returned a {type(out).__name__}; an estimator returns Advantages(advantages, "
                             "returns)")
    # non-finite inputs are model.on_nonfinite's to handle, not the estimator's fault
    inputs_finite = bool(rewards.isfinite().all()) and (values is None or bool(values.isfinite().all()))
    for field, tensor in zip(Advantages._fields, out, strict=True):
        if not isinstance(tensor, Tensor) or tensor.shape != rewards.shape:
            got = f"shape {tuple(tensor.shape)}" if isinstance(tensor, Tensor) else f"a {type(tensor).__name__}"
            raise UserInputError(f"{name} returned {field} of {got}; they are per token, laid out like the rewards "
                                 f"{tuple(rewards.shape)} (a per-sequence value goes to each of its tokens: "
                                 "per_token(values, mask))")
        if inputs_finite and not bool(tensor.isfinite().all()):
            raise UserInputError(f"{name} returned non-finite {field} ({tensor[~tensor.isfinite()][0].item()}); "
                                 "fix the estimator (e.g. a division by a group's zero standard deviation)")
    return out


def sequence_returns(rewards: Tensor, mask: Tensor) -> Tensor:
    """Each completion's undiscounted return ``R = sum_t r_t``. # (N, L) -> (N,)"""
    return (rewards * mask).sum(-1)


def per_token(values: Tensor, mask: Tensor) -> Tensor:
    """A per-sequence value at each of the sequence's tokens. # (N,) -> (N, L)"""
    return values[:, None] * mask


def grouped(values: Tensor, group_size: int) -> Tensor:
    """Per-sequence values in prompt groups. # (N,) -> (B, k)"""
    if values.shape[0] % group_size:
        raise ValueError(f"{values.shape[0]} completions do not split into groups of {group_size}")
    return values.view(-1, group_size)
