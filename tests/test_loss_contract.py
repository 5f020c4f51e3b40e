"""The contract every registered loss honours, checked for every name in ``list_losses()``.

Parametrizing over the registry (not over a hand-written list) means a newly registered loss is tested
automatically and cannot opt out.
"""

from __future__ import annotations

import pytest
import torch

import lightning_pref.losses  # noqa: F401 - registers the built-in losses
from lightning_pref.losses import PreferenceLoss
from lightning_pref.registry import get_loss, list_losses
from lightning_pref.types import LossOutput, SequenceLogps

NAMES = list_losses()
# Losses that score only the chosen (desirable) responses, one loss per chosen response.
CHOSEN_ONLY = {"nll"}


def random_logps(
    num_chosen: int, num_rejected: int, seed: int, *, requires_grad: bool = False
) -> SequenceLogps:
    """Summed log-probs of responses of 1-20 tokens with per-token means in [-4, -0.05]."""
    gen = torch.Generator().manual_seed(seed)
    chosen_tokens = torch.randint(1, 21, (num_chosen,), generator=gen)
    rejected_tokens = torch.randint(1, 21, (num_rejected,), generator=gen)
    chosen = -(torch.rand(num_chosen, generator=gen) * 3.95 + 0.05) * chosen_tokens
    rejected = -(torch.rand(num_rejected, generator=gen) * 3.95 + 0.05) * rejected_tokens
    return SequenceLogps(
        chosen.requires_grad_(requires_grad),
        rejected.requires_grad_(requires_grad),
        chosen_tokens,
        rejected_tokens,
    )


def call(
    loss: PreferenceLoss, num_chosen: int, num_rejected: int, *, requires_grad: bool = False
) -> tuple[LossOutput, SequenceLogps]:
    policy = random_logps(num_chosen, num_rejected, seed=0, requires_grad=requires_grad)
    # Same token counts as the policy: both score the same responses.
    reference_values = random_logps(num_chosen, num_rejected, seed=1)
    reference = SequenceLogps(
        reference_values.chosen, reference_values.rejected, policy.chosen_tokens, policy.rejected_tokens
    )
    kwargs = {"kl_baseline": torch.tensor(0.05)} if loss.requires_kl_baseline else {}
    out = loss(policy, reference if loss.requires_reference else None, **kwargs)
    return out, policy


def expected_shape(name: str, loss: PreferenceLoss, num_chosen: int, num_rejected: int) -> tuple[int]:
    if name in CHOSEN_ONLY:
        return (num_chosen,)
    return (num_chosen,) if loss.paired else (num_chosen + num_rejected,)


def test_registry_is_populated():
    assert {"dpo", "cdpo", "ipo", "kto", "simpo", "orpo", "nll", "weighted"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_constructible_without_arguments(name):
    loss = get_loss(name)
    assert isinstance(loss, PreferenceLoss)
    assert loss.registered_name == name


@pytest.mark.parametrize("name", NAMES)
def test_output_shapes_and_finite(name):
    loss = get_loss(name)
    num_chosen, num_rejected = 4, 4
    out, _ = call(loss, num_chosen, num_rejected)
    assert isinstance(out, LossOutput)
    assert out.losses.shape == expected_shape(name, loss, num_chosen, num_rejected)
    assert torch.isfinite(out.losses).all()
    assert out.chosen_rewards.shape == (num_chosen,)
    assert out.rejected_rewards.shape == (num_rejected,)
    assert torch.isfinite(out.chosen_rewards).all() and torch.isfinite(out.rejected_rewards).all()
    for key, value in out.metrics.items():
        assert isinstance(key, str) and value.ndim == 0 and torch.isfinite(value)


@pytest.mark.parametrize("name", NAMES)
def test_rewards_and_metrics_are_detached(name):
    out, _ = call(get_loss(name), 3, 3, requires_grad=True)
    assert out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad and out.chosen_rewards.grad_fn is None
    assert not out.rejected_rewards.requires_grad and out.rejected_rewards.grad_fn is None
    assert not any(value.requires_grad for value in out.metrics.values())


@pytest.mark.parametrize("name", NAMES)
def test_reference_none_accepted_iff_not_required(name):
    loss = get_loss(name)
    policy = random_logps(3, 3, seed=2)
    kwargs = {"kl_baseline": torch.tensor(0.05)} if loss.requires_kl_baseline else {}
    if loss.requires_reference:
        with pytest.raises(Exception):  # noqa: B017 - the contract only asks that it fails loudly
            loss(policy, None, **kwargs)
    else:
        out = loss(policy, None, **kwargs)
        assert torch.isfinite(out.losses).all()


@pytest.mark.parametrize("name", [n for n in NAMES if not get_loss(n).paired])
@pytest.mark.parametrize(("num_chosen", "num_rejected"), [(2, 5), (5, 2), (3, 0), (0, 3)])
def test_unpaired_losses_accept_unequal_counts(name, num_chosen, num_rejected):
    loss = get_loss(name)
    out, _ = call(loss, num_chosen, num_rejected)
    assert out.losses.shape == expected_shape(name, loss, num_chosen, num_rejected)
    assert torch.isfinite(out.losses).all()
    assert out.chosen_rewards.shape == (num_chosen,) and out.rejected_rewards.shape == (num_rejected,)


@pytest.mark.parametrize("name", NAMES)
def test_documented_with_paper(name):
    loss_cls = type(get_loss(name))
    assert loss_cls.__doc__ and loss_cls.__doc__.strip()
    assert loss_cls.paper.strip()


@pytest.mark.parametrize("name", NAMES)
def test_backward_gives_finite_policy_gradients(name):
    out, policy = call(get_loss(name), 4, 4, requires_grad=True)
    out.losses.mean().backward()
    grads = [g for g in (policy.chosen.grad, policy.rejected.grad) if g is not None]
    assert grads, "no gradient reached the policy log-probs"
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(torch.any(g != 0) for g in grads)
