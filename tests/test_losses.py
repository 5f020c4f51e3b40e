"""Numerical tests of the built-in losses.

Each loss is checked twice: against numbers derived by hand (the arithmetic is in the test's docstring) and
against an independent per-element formula written with :mod:`math` on random inputs. Inputs are float64 so
the comparisons can be tight.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest
import torch

import lightning_pref.losses  # noqa: F401 - registers the built-in losses
from lightning_pref.losses import (
    CDPOLoss,
    DPOLoss,
    HingeLoss,
    IPOLoss,
    KTOLoss,
    NLLLoss,
    PreferenceLoss,
    WeightedLoss,
)
from lightning_pref.registry import UnknownPluginError, get_loss, get_loss_class, list_losses
from lightning_pref.types import SequenceLogps

LN3 = math.log(3.0)


def seq(chosen, rejected, chosen_tokens=None, rejected_tokens=None, *, requires_grad=False) -> SequenceLogps:
    """SequenceLogps from plain lists; token counts default to 1 (so means equal sums)."""
    chosen_tokens = [1] * len(chosen) if chosen_tokens is None else chosen_tokens
    rejected_tokens = [1] * len(rejected) if rejected_tokens is None else rejected_tokens
    return SequenceLogps(
        chosen=torch.tensor(chosen, dtype=torch.float64, requires_grad=requires_grad),
        rejected=torch.tensor(rejected, dtype=torch.float64, requires_grad=requires_grad),
        chosen_tokens=torch.tensor(chosen_tokens),
        rejected_tokens=torch.tensor(rejected_tokens),
    )


def pair_with_margin(h: float) -> tuple[SequenceLogps, SequenceLogps]:
    """One pair whose chosen log-ratio is ``h`` and rejected log-ratio 0, so the DPO margin is ``h``."""
    return seq([-5.0 + h], [-7.0]), seq([-5.0], [-7.0])


def values(t: torch.Tensor) -> list[float]:
    return t.detach().tolist()


# --- plain-Python reference formulas ---------------------------------------------------------------------


def log_sigmoid(x: float) -> float:
    """log σ(x) = -log(1 + e^-x), evaluated on the side where exp cannot overflow."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ``r`` is one row of a random batch: policy/reference chosen/rejected sums (pc, pr, rc, rr) and lengths (nc, nr).
def ref_dpo(r, beta=0.1):
    return -log_sigmoid(beta * ((r["pc"] - r["rc"]) - (r["pr"] - r["rr"])))


def ref_cdpo(r, beta=0.1, epsilon=0.1):
    z = beta * ((r["pc"] - r["rc"]) - (r["pr"] - r["rr"]))
    return -(1 - epsilon) * log_sigmoid(z) - epsilon * log_sigmoid(-z)


def ref_ipo(r, beta=0.1, length_normalize=True):
    if length_normalize:
        h = (r["pc"] - r["rc"]) / r["nc"] - (r["pr"] - r["rr"]) / r["nr"]
    else:
        h = (r["pc"] - r["rc"]) - (r["pr"] - r["rr"])
    return (h - 1 / (2 * beta)) ** 2


def ref_hinge(r, beta=0.1):
    return max(0.0, 1 - beta * ((r["pc"] - r["rc"]) - (r["pr"] - r["rr"])))


def ref_robust(r, beta=0.1, epsilon=0.1):
    z = beta * ((r["pc"] - r["rc"]) - (r["pr"] - r["rr"]))
    return (-(1 - epsilon) * log_sigmoid(z) + epsilon * log_sigmoid(-z)) / (1 - 2 * epsilon)


def ref_simpo(r, beta=2.0, gamma=1.0):
    return -log_sigmoid(beta * r["pc"] / r["nc"] - beta * r["pr"] / r["nr"] - gamma)


def ref_orpo(r, beta=0.1):
    p_chosen, p_rejected = math.exp(r["pc"] / r["nc"]), math.exp(r["pr"] / r["nr"])
    log_odds_ratio = math.log(p_chosen / (1 - p_chosen)) - math.log(p_rejected / (1 - p_rejected))
    return -math.log(p_chosen) - beta * log_sigmoid(log_odds_ratio)


def ref_sppo_hard(r, beta=0.1):
    return ((r["pc"] - r["rc"]) - 1 / (2 * beta)) ** 2 + ((r["pr"] - r["rr"]) + 1 / (2 * beta)) ** 2


def ref_apo_zero(r, beta=0.1):
    return (1 - sigmoid(beta * (r["pc"] - r["rc"]))) + sigmoid(beta * (r["pr"] - r["rr"]))


def ref_nca_pair(r, beta=0.1):
    a, b = beta * (r["pc"] - r["rc"]), beta * (r["pr"] - r["rr"])
    return -log_sigmoid(a) - 0.5 * log_sigmoid(-a) - 0.5 * log_sigmoid(-b)


def ref_nll(r):
    return -r["pc"] / r["nc"]


def random_rows(seed: int, n: int = 6) -> list[dict[str, float]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        nc, nr = rng.randint(1, 30), rng.randint(1, 30)
        # Per-token means in [-3, -0.05]: realistic, and away from 0 where ORPO's odds blow up.
        pc, pr = nc * rng.uniform(-3, -0.05), nr * rng.uniform(-3, -0.05)
        rows.append(
            {
                "pc": pc,
                "pr": pr,
                "rc": pc + rng.uniform(-4, 4),
                "rr": pr + rng.uniform(-4, 4),
                "nc": nc,
                "nr": nr,
            }
        )
    return rows


def batch_from_rows(rows) -> tuple[SequenceLogps, SequenceLogps]:
    nc, nr = [r["nc"] for r in rows], [r["nr"] for r in rows]
    policy = seq([r["pc"] for r in rows], [r["pr"] for r in rows], nc, nr)
    reference = seq([r["rc"] for r in rows], [r["rr"] for r in rows], nc, nr)
    return policy, reference


# --- hand-derived values ------------------------------------------------------------------------------------


def test_dpo_hand_value():
    """h = ln 3, β = 1: σ(ln 3) = 3/4, so L = -ln(3/4) = ln(4/3) = 0.2876821. Rewards: β·ln 3 and 0."""
    out = DPOLoss(beta=1.0)(*pair_with_margin(LN3))
    assert values(out.losses) == pytest.approx([0.2876821], abs=1e-7)
    assert values(out.chosen_rewards) == pytest.approx([1.0986123], abs=1e-7)
    assert values(out.rejected_rewards) == pytest.approx([0.0], abs=1e-12)


def test_cdpo_hand_value():
    """h = ln 3, β = 1, ε = 0.1: σ(ln 3) = 3/4, σ(-ln 3) = 1/4.

    L = -0.9·ln(3/4) - 0.1·ln(1/4) = 0.9·0.2876821 + 0.1·1.3862944 = 0.2589139 + 0.1386294 = 0.3975433.
    """
    out = CDPOLoss(beta=1.0, epsilon=0.1)(*pair_with_margin(LN3))
    assert values(out.losses) == pytest.approx([0.3975433], abs=1e-7)


def test_ipo_hand_values_both_normalizations():
    """β = 0.5, so the target margin 1/(2β) = 1.

    Chosen log-ratio 6 over 2 tokens (mean 3), rejected log-ratio -4 over 4 tokens (mean -1).
    Length-normalized: h' = 3 - (-1) = 4, L = (4 - 1)² = 9. Summed: h = 6 - (-4) = 10, L = (10 - 1)² = 81.
    Rewards use sums: β·6 = 3 and β·(-4) = -2.
    """
    policy, reference = seq([-4.0], [-12.0], [2], [4]), seq([-10.0], [-8.0], [2], [4])
    normalized = IPOLoss(beta=0.5)(policy, reference)
    summed = IPOLoss(beta=0.5, length_normalize=False)(policy, reference)
    assert values(normalized.losses) == pytest.approx([9.0])
    assert values(summed.losses) == pytest.approx([81.0])
    assert values(normalized.chosen_rewards) == pytest.approx([3.0])
    assert values(normalized.rejected_rewards) == pytest.approx([-2.0])


def test_kto_hand_values():
    """β = 1, z0 = 0.5, λ_D = 1, λ_U = 2.

    Desirable r = 0.5 + ln 3: 1·(1 - σ(ln 3)) = 1/4. Desirable r = 0.5: 1·(1 - σ(0)) = 1/2.
    Undesirable r = 0.5 + ln 3: 2·(1 - σ(0.5 - r)) = 2·(1 - σ(-ln 3)) = 2·3/4 = 3/2.
    Losses = cat(desirable, undesirable) = [0.25, 0.5, 1.5]; metrics["kl"] = 0.5.
    """
    policy = seq([0.5 + LN3 - 9.0, 0.5 - 9.0], [0.5 + LN3 - 9.0])
    reference = seq([-9.0, -9.0], [-9.0])
    out = KTOLoss(beta=1.0, desirable_weight=1.0, undesirable_weight=2.0)(
        policy, reference, kl_baseline=torch.tensor(0.5, dtype=torch.float64)
    )
    assert values(out.losses) == pytest.approx([0.25, 0.5, 1.5])
    assert out.metrics["kl"].item() == pytest.approx(0.5)
    assert values(out.chosen_rewards) == pytest.approx([0.5 + LN3, 0.5])


def test_hinge_hand_values():
    """β = 0.5: h = 1 → max(0, 1 - 0.5) = 0.5; h = 4 → max(0, 1 - 2) = 0; h = -2 → max(0, 1 + 1) = 2."""
    policy, reference = seq([1.0, 4.0, -2.0], [0.0, 0.0, 0.0]), seq([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    assert values(HingeLoss(beta=0.5)(policy, reference).losses) == pytest.approx([0.5, 0.0, 2.0])


def test_robust_hand_value():
    """h = ln 3, β = 1, ε = 0.1: [-0.9·ln(3/4) + 0.1·ln(1/4)] / (1 - 0.2)
    = (0.2589139 - 0.1386294) / 0.8 = 0.1202845 / 0.8 = 0.1503556.
    """
    out = get_loss("robust", beta=1.0, epsilon=0.1)(*pair_with_margin(LN3))
    assert values(out.losses) == pytest.approx([0.1503556], abs=1e-7)


def test_simpo_hand_value_with_defaults():
    """Defaults β = 2, γ = 1. Chosen -2 over 2 tokens (ā = -1), rejected -4.5 over 3 tokens (ā = -1.5).

    β(ā_c - ā_r) - γ = 2·0.5 - 1 = 0, L = -ln σ(0) = ln 2 = 0.6931472. Rewards β·ā = -2 and -3.
    """
    out = get_loss("simpo")(seq([-2.0], [-4.5], [2], [3]), None)
    assert values(out.losses) == pytest.approx([0.6931472], abs=1e-7)
    assert values(out.chosen_rewards) == pytest.approx([-2.0])
    assert values(out.rejected_rewards) == pytest.approx([-3.0])


def test_orpo_hand_value():
    """λ = 0.1. Chosen 2 tokens of log(1/2) (ā_c = ln ½, P = 1/2, odds 1, log-odds 0); rejected 3 tokens of
    log(1/4) (ā_r = ln ¼, P = 1/4, odds 1/3, log-odds -ln 3).

    Log odds ratio = ln 3, -ln σ(ln 3) = ln(4/3) = 0.2876821; NLL = -ā_c = ln 2 = 0.6931472.
    L = 0.6931472 + 0.1·0.2876821 = 0.7219154. Rewards λ·ā = -0.0693147 and -0.1386294.
    """
    out = get_loss("orpo", beta=0.1)(seq([2 * math.log(0.5)], [3 * math.log(0.25)], [2], [3]), None)
    assert values(out.losses) == pytest.approx([0.7219154], abs=1e-7)
    assert values(out.chosen_rewards) == pytest.approx([-0.0693147], abs=1e-7)
    assert values(out.rejected_rewards) == pytest.approx([-0.1386294], abs=1e-7)


def test_bco_pair_hand_values_and_running_shift():
    """β = 1, training mode.

    Step 1: rewards r_w = 1, r_l = -1, batch mean 0, so δ = 0 and
    L = -ln σ(1) - ln σ(1) = 2·ln(1 + e^-1) = 2·0.3132617 = 0.6265234.
    Step 2: r_w = 2, r_l = 0, batch mean 1, δ = mean(0, 1) = 0.5 and
    L = -ln σ(1.5) - ln σ(0.5) = 0.2014133 + 0.4740770 = 0.6754903.
    Eval mode: δ stays 0.5 whatever the batch (mean 1.5 here): r_w = 2.5, r_l = 0.5 gives
    -ln σ(2) - ln σ(0) = 0.1269280 + 0.6931472 = 0.8200752.
    """
    loss = get_loss("bco_pair", beta=1.0)
    assert values(loss(*pair_at(1.0, -1.0)).losses) == pytest.approx([0.6265234], abs=1e-7)
    assert values(loss(*pair_at(2.0, 0.0)).losses) == pytest.approx([0.6754903], abs=1e-7)
    loss.eval()
    assert values(loss(*pair_at(2.5, 0.5)).losses) == pytest.approx([0.8200752], abs=1e-7)
    assert loss.reward_shift.item() == pytest.approx(0.5)
    assert "reward_shift" in loss.state_dict()  # survives checkpoints


def test_orpo_is_finite_when_a_response_is_certain():
    """A mean log-prob of exactly 0 (P = 1) has infinite odds; the loss caps it instead of returning inf/nan."""
    policy = seq([0.0, -2.0], [0.0, -1.0], [3, 2], [1, 2], requires_grad=True)
    out = get_loss("orpo")(policy, None)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all()
    assert torch.isfinite(policy.chosen.grad).all() and torch.isfinite(policy.rejected.grad).all()


def pair_at(chosen_logratio: float, rejected_logratio: float) -> tuple[SequenceLogps, SequenceLogps]:
    return seq([-3.0 + chosen_logratio], [-4.0 + rejected_logratio]), seq([-3.0], [-4.0])


def test_sppo_hard_hand_values():
    """β = 0.5, so 1/(2β) = 1. a = 1, b = -1: (1-1)² + (-1+1)² = 0. a = 3, b = 1: (3-1)² + (1+1)² = 8."""
    policy, reference = seq([1.0, 3.0], [-1.0, 1.0]), seq([0.0, 0.0], [0.0, 0.0])
    assert values(get_loss("sppo_hard", beta=0.5)(policy, reference).losses) == pytest.approx([0.0, 8.0])


def test_apo_zero_hand_values():
    """β = 1. a = ln 3, b = -ln 3: (1 - 3/4) + 1/4 = 0.5. a = b = 0: (1 - 1/2) + 1/2 = 1."""
    policy, reference = seq([LN3, 0.0], [-LN3, 0.0]), seq([0.0, 0.0], [0.0, 0.0])
    assert values(get_loss("apo_zero", beta=1.0)(policy, reference).losses) == pytest.approx([0.5, 1.0])


def test_nca_pair_hand_value():
    """β = 1, a = ln 3, b = -ln 3: σ(a) = 3/4, σ(-a) = 1/4, σ(-b) = 3/4.

    L = -ln(3/4) - ½·ln(1/4) - ½·ln(3/4) = 0.2876821 + 0.6931472 + 0.1438410 = 1.1246703.
    """
    policy, reference = seq([LN3], [-LN3]), seq([0.0], [0.0])
    assert values(get_loss("nca_pair", beta=1.0)(policy, reference).losses) == pytest.approx(
        [1.1246703], abs=1e-7
    )


def test_nll_hand_values():
    """-6 over 3 tokens → 6/3 = 2; -1 over 4 tokens → 1/4 = 0.25. Rejected responses are ignored."""
    out = NLLLoss()(seq([-6.0, -1.0], [-100.0, -100.0], [3, 4], [1, 1]), None)
    assert values(out.losses) == pytest.approx([2.0, 0.25])
    assert values(out.chosen_rewards) == pytest.approx([-2.0, -0.25])


def test_weighted_hand_value():
    """{dpo: 1, nll: 0.2} with dpo β = 1. Pair with h = ln 3 and chosen log-prob -5 + ln 3 over 1 token.

    dpo = ln(4/3) = 0.2876821; nll = 5 - ln 3 = 3.9013877; L = 0.2876821 + 0.2·3.9013877 = 1.0679596.
    """
    loss = WeightedLoss(terms={"dpo": 1.0, "nll": 0.2}, term_args={"dpo": {"beta": 1.0}})
    out = loss(*pair_with_margin(LN3))
    assert values(out.losses) == pytest.approx([1.0679596], abs=1e-7)
    assert out.metrics["loss_dpo"].item() == pytest.approx(0.2876821, abs=1e-7)
    assert out.metrics["loss_nll"].item() == pytest.approx(3.9013877, abs=1e-7)


# --- independent formulas on random inputs ------------------------------------------------------------------

PAIRED_FORMULAS: list[tuple[str, dict, Callable]] = [
    ("dpo", {}, ref_dpo),
    ("dpo", {"beta": 0.7}, lambda r: ref_dpo(r, beta=0.7)),
    ("cdpo", {}, ref_cdpo),
    ("cdpo", {"beta": 0.3, "epsilon": 0.25}, lambda r: ref_cdpo(r, beta=0.3, epsilon=0.25)),
    ("ipo", {}, ref_ipo),
    ("ipo", {"beta": 0.5, "length_normalize": False}, lambda r: ref_ipo(r, beta=0.5, length_normalize=False)),
    ("hinge", {"beta": 0.2}, lambda r: ref_hinge(r, beta=0.2)),
    ("robust", {}, ref_robust),
    ("robust", {"beta": 0.5, "epsilon": 0.3}, lambda r: ref_robust(r, beta=0.5, epsilon=0.3)),
    ("simpo", {}, ref_simpo),
    ("simpo", {"beta": 2.5, "gamma": 0.3}, lambda r: ref_simpo(r, beta=2.5, gamma=0.3)),
    ("orpo", {}, ref_orpo),
    ("orpo", {"beta": 0.5}, lambda r: ref_orpo(r, beta=0.5)),
    ("sppo_hard", {}, ref_sppo_hard),
    ("sppo_hard", {"beta": 1.0}, lambda r: ref_sppo_hard(r, beta=1.0)),
    ("apo_zero", {"beta": 0.3}, lambda r: ref_apo_zero(r, beta=0.3)),
    ("nca_pair", {"beta": 0.3}, lambda r: ref_nca_pair(r, beta=0.3)),
    ("nll", {}, ref_nll),
    ("weighted", {}, lambda r: ref_dpo(r) + ref_nll(r)),
    (
        "weighted",
        {"terms": {"ipo": 0.5, "hinge": 2.0}, "term_args": {"hinge": {"beta": 0.3}}},
        lambda r: 0.5 * ref_ipo(r) + 2.0 * ref_hinge(r, beta=0.3),
    ),
]


@pytest.mark.parametrize(
    ("name", "kwargs", "formula"),
    [pytest.param(*case, id=f"{case[0]}-{'custom' if case[1] else 'defaults'}") for case in PAIRED_FORMULAS],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_independent_formula(name, kwargs, formula, seed):
    rows = random_rows(seed)
    policy, reference = batch_from_rows(rows)
    loss = get_loss(name, **kwargs)
    out = loss(policy, reference if loss.requires_reference else None)
    assert values(out.losses) == pytest.approx([formula(r) for r in rows], rel=1e-9, abs=1e-12)


def test_bco_pair_matches_independent_formula():
    """First training step: δ is the mean of all 2B rewards β·a and β·b."""
    rows, beta = random_rows(3), 0.2
    rewards = [beta * (r["pc"] - r["rc"]) for r in rows] + [beta * (r["pr"] - r["rr"]) for r in rows]
    delta = sum(rewards) / len(rewards)
    expected = [
        -log_sigmoid(beta * (r["pc"] - r["rc"]) - delta) - log_sigmoid(-(beta * (r["pr"] - r["rr"]) - delta))
        for r in rows
    ]
    out = get_loss("bco_pair", beta=beta)(*batch_from_rows(rows))
    assert values(out.losses) == pytest.approx(expected, rel=1e-9)


def test_kto_matches_independent_formula():
    """Unequal counts: 3 desirable and 5 undesirable examples."""
    rng = random.Random(7)
    beta, z0, lam_d, lam_u = 0.3, 0.25, 1.0, 1.33
    pd, rd = [rng.uniform(-50, -5) for _ in range(3)], [rng.uniform(-50, -5) for _ in range(3)]
    pu, ru = [rng.uniform(-50, -5) for _ in range(5)], [rng.uniform(-50, -5) for _ in range(5)]
    expected = [lam_d * (1 - sigmoid(beta * ((p - r) - z0))) for p, r in zip(pd, rd, strict=True)]
    expected += [lam_u * (1 - sigmoid(beta * (z0 - (p - r)))) for p, r in zip(pu, ru, strict=True)]
    loss = KTOLoss(beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u)
    out = loss(seq(pd, pu), seq(rd, ru), kl_baseline=torch.tensor(z0, dtype=torch.float64))
    assert values(out.losses) == pytest.approx(expected, rel=1e-9)


# --- properties ---------------------------------------------------------------------------------------------


def test_cdpo_with_zero_epsilon_is_dpo():
    policy, reference = batch_from_rows(random_rows(11))
    torch.testing.assert_close(
        CDPOLoss(beta=0.3, epsilon=0.0)(policy, reference).losses, DPOLoss(beta=0.3)(policy, reference).losses
    )


def test_robust_with_zero_epsilon_is_dpo():
    policy, reference = batch_from_rows(random_rows(12))
    torch.testing.assert_close(
        get_loss("robust", beta=0.3, epsilon=0.0)(policy, reference).losses,
        DPOLoss(beta=0.3)(policy, reference).losses,
    )


def test_ipo_normalizations_differ_with_lengths_and_agree_at_length_one():
    rows = random_rows(5)
    policy, reference = batch_from_rows(rows)
    assert any(r["nc"] != 1 or r["nr"] != 1 for r in rows)
    normalized, summed = (
        IPOLoss()(policy, reference).losses,
        IPOLoss(length_normalize=False)(policy, reference).losses,
    )
    assert not torch.allclose(normalized, summed)

    for r in rows:
        r["nc"] = r["nr"] = 1
    policy, reference = batch_from_rows(rows)
    torch.testing.assert_close(
        IPOLoss()(policy, reference).losses, IPOLoss(length_normalize=False)(policy, reference).losses
    )


def test_different_losses_give_different_values():
    policy, reference = batch_from_rows(random_rows(9))
    dpo = DPOLoss()(policy, reference).losses
    assert not torch.allclose(dpo, IPOLoss()(policy, reference).losses)
    assert not torch.allclose(dpo, HingeLoss()(policy, reference).losses)


@pytest.mark.parametrize("name", [n for n in list_losses() if get_loss_class(n).requires_reference])
def test_gradients_reach_policy_only(name):
    """Reference log-probs are frozen: even if they carry requires_grad, no gradient reaches them."""
    rows = random_rows(4)
    nc, nr = [r["nc"] for r in rows], [r["nr"] for r in rows]
    policy = seq([r["pc"] for r in rows], [r["pr"] for r in rows], nc, nr, requires_grad=True)
    reference = seq([r["rc"] for r in rows], [r["rr"] for r in rows], nc, nr, requires_grad=True)
    loss = get_loss(name)
    kwargs = {"kl_baseline": torch.tensor(0.1, dtype=torch.float64)} if loss.requires_kl_baseline else {}
    out = loss(policy, reference, **kwargs)
    out.losses.sum().backward()
    assert policy.chosen.grad is not None and torch.any(policy.chosen.grad != 0)
    assert reference.chosen.grad is None and reference.rejected.grad is None
    assert out.chosen_rewards.grad_fn is None and out.rejected_rewards.grad_fn is None


def test_kto_only_desirable_examples():
    out = KTOLoss()(seq([-3.0, -4.0, -5.0], []), seq([-3.5, -4.0, -4.0], []), kl_baseline=torch.tensor(0.1))
    assert out.losses.shape == (3,) and torch.isfinite(out.losses).all()
    assert out.rejected_rewards.shape == (0,)


def test_kto_only_undesirable_examples():
    out = KTOLoss()(seq([], [-3.0, -4.0]), seq([], [-3.5, -4.0]), kl_baseline=torch.tensor(0.1))
    assert out.losses.shape == (2,) and torch.isfinite(out.losses).all()
    assert out.chosen_rewards.shape == (0,)


def test_kto_without_kl_baseline_raises():
    with pytest.raises(ValueError, match="kl_baseline"):
        KTOLoss()(seq([-3.0], [-4.0]), seq([-3.0], [-4.0]))


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("dpo", {"beta": 0.0}, "dpo: beta"),
        ("cdpo", {"epsilon": 0.5}, "cdpo: epsilon"),
        ("cdpo", {"epsilon": -0.1}, "cdpo: epsilon"),
        ("cdpo", {"beta": -1.0}, "cdpo: beta"),
        ("ipo", {"beta": 0.0}, "ipo: beta"),
        ("kto", {"beta": 0.0}, "kto: beta"),
        ("kto", {"desirable_weight": -1.0}, "kto: desirable_weight"),
        ("kto", {"undesirable_weight": -1.0}, "kto: undesirable_weight"),
        ("hinge", {"beta": 0.0}, "hinge: beta"),
        ("robust", {"epsilon": 0.5}, "robust: epsilon"),
        ("simpo", {"beta": 0.0}, "simpo: beta"),
        ("simpo", {"gamma": -0.5}, "simpo: gamma"),
        ("orpo", {"beta": 0.0}, "orpo: beta"),
        ("bco_pair", {"beta": 0.0}, "bco_pair: beta"),
        ("sppo_hard", {"beta": 0.0}, "sppo_hard: beta"),
        ("apo_zero", {"beta": 0.0}, "apo_zero: beta"),
        ("nca_pair", {"beta": 0.0}, "nca_pair: beta"),
        ("weighted", {"terms": {}}, "weighted: terms"),
        ("weighted", {"terms": {"dpo": 1.0}, "term_args": {"ipo": {}}}, "weighted: term_args"),
        ("weighted", {"terms": {"dpo": 1.0}, "term_args": {"dpo": {"beta": -1.0}}}, "dpo: beta"),
    ],
)
def test_constructor_validation(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_loss(name, **kwargs)


def test_weighted_rejects_unknown_term():
    with pytest.raises(UnknownPluginError, match="Did you mean 'dpo'"):
        WeightedLoss(terms={"dpp": 1.0})


def test_weighted_equals_dpo_plus_scaled_nll():
    policy, reference = batch_from_rows(random_rows(21))
    out = WeightedLoss(terms={"dpo": 1.0, "nll": 0.2})(policy, reference)
    dpo = DPOLoss()(policy, reference)
    expected = dpo.losses + 0.2 * NLLLoss()(policy, None).losses
    torch.testing.assert_close(out.losses, expected)
    torch.testing.assert_close(out.chosen_rewards, dpo.chosen_rewards)  # rewards of the first term
    assert out.metrics["loss_dpo"].item() == pytest.approx(dpo.losses.mean().item())


def test_weighted_derives_requirements_from_terms():
    rpo = WeightedLoss()
    assert (rpo.requires_reference, rpo.paired, rpo.requires_kl_baseline, rpo.beta) == (
        True,
        True,
        False,
        0.1,
    )
    reference_free = WeightedLoss(terms={"simpo": 1.0, "nll": 0.5})
    assert (reference_free.requires_reference, reference_free.beta) == (False, 2.0)
    kto = WeightedLoss(terms={"kto": 1.0})
    assert (kto.paired, kto.requires_kl_baseline) == (False, True)
    assert not hasattr(WeightedLoss(terms={"nll": 1.0}), "beta")
    assert (
        WeightedLoss.requires_reference is True and WeightedLoss.paired is True
    )  # class attributes untouched


def test_weighted_passes_metrics_and_kl_baseline_through():
    out = WeightedLoss(terms={"kto": 1.0})(
        seq([-3.0], [-4.0]), seq([-3.0], [-4.0]), kl_baseline=torch.tensor(0.2)
    )
    assert out.metrics["kl"].item() == pytest.approx(0.2)
    assert "loss_kto" in out.metrics


def test_weighted_rejects_terms_of_different_shapes():
    loss = WeightedLoss(terms={"kto": 1.0, "nll": 1.0})
    with pytest.raises(ValueError, match="different shapes"):
        loss(seq([-3.0, -2.0], [-4.0]), seq([-3.0, -2.0], [-4.0]), kl_baseline=torch.tensor(0.1))


def test_weighted_default_terms_are_not_shared():
    first = WeightedLoss()
    first.weights["nll"] = 5.0
    assert WeightedLoss().weights == {"dpo": 1.0, "nll": 1.0}


def test_weighted_instantiates_from_yaml():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--loss", type=PreferenceLoss)
    cfg = parser.parse_string(
        "loss:\n"
        "  class_path: lightning_pref.losses.WeightedLoss\n"
        "  init_args:\n"
        "    terms: {dpo: 1.0, nll: 0.2}\n"
        "    term_args: {dpo: {beta: 0.05}}\n"
    )
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in 4.49
    loss = instantiate(cfg).loss
    assert isinstance(loss, WeightedLoss)
    assert loss.weights == {"dpo": 1.0, "nll": 0.2}
    assert loss.beta == 0.05
