"""The RL stage: advantage estimators and PPO's objectives against hand-derived numbers and independent formulas,
the first update's ratio, where rewards and the KL penalty land, the critic's start, PPO-ptx's gradient, option
checks, learning on the embedded default judged by generation, exact resume."""

from __future__ import annotations

import csv
import math
from functools import partial

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from lightning_pref import PolicyGradientModule, PreferenceDataModule
from lightning_pref.errors import UserInputError
from lightning_pref.generation import GenerationOptions
from lightning_pref.judges.rules import NoShoutingJudge
from lightning_pref.rl.advantages import GAE, GRPO, RLOO, ReinforcePP
from lightning_pref.rl.kl_penalty import KLController, kl_estimate
from lightning_pref.rl.objective import clipped_surrogate, clipped_value_loss, token_weights
from tests.support import REPO, TINY, write_jsonl

PROMPTS = [list(b"Hello there"), list(b"Why"), list(b"A longer prompt here")]


def _module(**kwargs) -> PolicyGradientModule:
    kwargs.setdefault("judge", NoShoutingJudge())
    kwargs.setdefault("generation", GenerationOptions(max_new_tokens=10, do_sample=True))
    kwargs.setdefault("optimizer", partial(torch.optim.AdamW, lr=1e-3))
    kwargs.setdefault("policy", TINY)
    return PolicyGradientModule(tokenizer="byte", **kwargs)


# ---------------------------------------------------------------------------------------------- estimators
def test_gae_against_hand_derived_numbers():
    """gamma 1, lambda 0.5: delta = r + V_next - V; A_t = delta_t + 0.5 A_{t+1}; V after the last token is 0."""
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.4], [0.3, 0.1, 9.0]])  # 9.0 sits on padding: never read
    mask = torch.tensor([[True, True, True], [True, True, False]])
    advantages, returns = GAE(gamma=1.0, lam=0.5)(rewards, mask, 1, values)
    # row 0: delta = (-0.3, 0.2, 0.6) -> A = (-0.05, 0.5, 0.6); row 1: delta = (-0.2, 0.9) -> A = (0.25, 0.9)
    torch.testing.assert_close(advantages, torch.tensor([[-0.05, 0.5, 0.6], [0.25, 0.9, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.45, 0.7, 1.0], [0.55, 1.0, 0.0]]))


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (0.99, 0.0)])
def test_gae_equals_the_sum_of_discounted_td_errors(gamma, lam):
    """Eq. 16 written out: A_t = sum_l (gamma lambda)^l delta_{t+l}, an independent double loop."""
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    lengths = [6, 4, 1]
    mask = torch.arange(6) < torch.tensor(lengths)[:, None]
    advantages, _ = GAE(gamma, lam)(rewards, mask, 1, values)
    for n, length in enumerate(lengths):
        v = [float(values[n, t]) for t in range(length)] + [0.0]
        delta = [float(rewards[n, t]) + gamma * v[t + 1] - v[t] for t in range(length)]
        for t in range(length):
            expected = sum((gamma * lam) ** j * delta[t + j] for j in range(length - t))
            assert float(advantages[n, t]) == pytest.approx(expected, abs=1e-5)
        assert advantages[n, length:].abs().sum() == 0


def _returns(values: list[float], width: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards whose sums are ``values`` (all on the last of ``width`` tokens)."""
    rewards = torch.zeros(len(values), width)
    rewards[:, -1] = torch.tensor(values)
    return rewards, torch.ones(len(values), width, dtype=torch.bool)


def test_rloo_leave_one_out_baseline():
    rewards, mask = _returns([1.0, 2.0, 4.0, 5.0])
    advantages, _ = RLOO()(rewards, mask, 4)
    # baseline of each = mean of the other three: 11/3, 10/3, 8/3, 7/3
    torch.testing.assert_close(advantages[:, 0], torch.tensor([-8 / 3, -4 / 3, 4 / 3, 8 / 3]))
    assert torch.equal(advantages[:, 0], advantages[:, 2])  # every token of a completion gets its advantage


def test_grpo_group_normalization_and_dr_grpo():
    rewards, mask = _returns([1.0, 2.0, 4.0, 5.0, 3.0, 3.0, 3.0, 3.0])
    advantages, _ = GRPO(eps=1e-4)(rewards, mask, 4)
    std = math.sqrt(10 / 3)  # unbiased std of (1, 2, 4, 5)
    torch.testing.assert_close(advantages[:4, 0], torch.tensor([-2.0, -1.0, 1.0, 2.0]) / (std + 1e-4))
    assert advantages[4:].abs().sum() == 0  # a group of equal rewards teaches nothing
    centred, _ = GRPO(scale_std=False)(rewards, mask, 4)
    torch.testing.assert_close(centred[:4, 0], torch.tensor([-2.0, -1.0, 1.0, 2.0]))


def test_reinforce_pp_global_normalization():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    advantages, returns = ReinforcePP(gamma=1.0)(rewards, mask, 1)
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]]))
    mean, std = 1.4, math.sqrt(0.24)  # over the five real tokens' returns (1, 1, 1, 2, 2)
    expected = (torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]]) - mean) / (std + 1e-8) * mask
    torch.testing.assert_close(advantages, expected)
    # the statistics are the global batch's: a reduce that doubles the sums (two identical processes) changes nothing
    doubled, _ = ReinforcePP(gamma=1.0)(rewards, mask, 1, reduce=lambda t: 2 * t)
    torch.testing.assert_close(doubled, advantages)


def test_estimators_refuse_what_they_cannot_do():
    rewards, mask = _returns([1.0, 2.0])
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        RLOO()(rewards, mask, 1)
    with pytest.raises(ValueError, match="critic"):
        GAE()(rewards, mask, 1)


# ---------------------------------------------------------------------------------------------- objectives
def test_clipped_surrogate_against_the_formula():
    logps = torch.tensor([[math.log(1.5), math.log(0.5), 0.0, math.log(1.1)]])
    old = torch.zeros(1, 4)
    advantages = torch.tensor([[1.0, -1.0, 2.0, -3.0]])
    loss, ratio = clipped_surrogate(logps, old, advantages, clip=0.2)
    # -min(r A, clip(r) A): 1.5 -> -1.2; 0.5 with A<0 -> -min(-0.5, -0.8) = 0.8; r=1 -> -2; 1.1 in range -> 3.3
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 0.8, -2.0, 3.3]]))
    torch.testing.assert_close(ratio, torch.tensor([[1.5, 0.5, 1.0, 1.1]]))


def test_clipped_value_loss_against_the_formula():
    values, old, returns = torch.tensor([1.0, 0.6, 3.0]), torch.tensor([0.5, 0.5, 3.0]), torch.tensor([2.0, 2.0, 2.0])
    loss = clipped_value_loss(values, old, returns, clip=0.2)
    # 0.5 max((V - R)^2, (clip(V, old +- 0.2) - R)^2): (1, 1.69) -> 0.845; (1.96, 1.96) -> 0.98; (1, 1) -> 0.5
    torch.testing.assert_close(loss, torch.tensor([0.845, 0.98, 0.5]))
    torch.testing.assert_close(clipped_value_loss(values, old, returns, clip=None), 0.5 * (values - returns) ** 2)


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "constant"])
def test_aggregation_is_the_same_split_in_micro_batches(aggregation):
    g = torch.Generator().manual_seed(1)
    per_token = torch.randn(6, 5, generator=g, requires_grad=True)
    mask = torch.arange(5) < torch.tensor([5, 3, 1, 4, 2, 5])[:, None]
    tokens, sequences = float(mask.sum()), 6.0
    whole = (per_token * token_weights(mask, aggregation, 8, tokens, sequences)).sum()
    parts = sum((per_token[rows] * token_weights(mask[rows], aggregation, 8, tokens, sequences)).sum()
                for rows in torch.arange(6).chunk(3))
    torch.testing.assert_close(parts, whole)
    expected = {"token_mean": (per_token * mask).sum() / mask.sum(),
                "sequence_mean": ((per_token * mask).sum(-1) / mask.sum(-1)).mean(),
                "constant": (per_token * mask).sum() / (6 * 8)}[aggregation]
    torch.testing.assert_close(whole, expected)


def test_kl_estimators_and_the_adaptive_controller():
    logps, reference = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    log_rho = reference - logps  # (-0.5, 1.0)
    torch.testing.assert_close(kl_estimate(logps, reference, "k1"), -log_rho)
    torch.testing.assert_close(kl_estimate(logps, reference, "k2"), 0.5 * log_rho**2)
    torch.testing.assert_close(kl_estimate(logps, reference, "k3"), log_rho.exp() - 1 - log_rho)
    controller = KLController(0.1, target=6.0, horizon=100)
    controller.update(kl=12.0, completions=10)  # error clipped to 0.2: beta * (1 + 0.2 * 10 / 100)
    assert controller.value == pytest.approx(0.1 * 1.02)
    fixed = KLController(0.1)
    fixed.update(kl=100.0, completions=10)
    assert fixed.value == 0.1


# ------------------------------------------------------------------------------------------ the module
@pytest.mark.parametrize("packing", [False, True, "auto"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_first_update_ratio_is_one(packing, temperature):
    """The training forward divides the logits by the sampling temperature as generation did: the log-probs of
    the sampled tokens equal the rollout's, padded, packed, or packed with each prompt once for its k samples."""
    module = _module(estimator={"class_path": "grpo"}, samples_per_prompt=3,
                     generation=GenerationOptions(max_new_tokens=12, do_sample=True, temperature=temperature))
    module.configure_model()
    rollout = module.roll_out(PROMPTS, ["a", "b", "c"], seed=0)
    experience = module.experience(rollout, packing)
    current = module.policy.token_logps(module.sequence_batch(experience.sequences, packing), temperature)
    width = experience.old_logps.shape[1]
    assert torch.equal(current.mask[:, :width], experience.mask)
    difference = (current.logps[:, :width].detach() - experience.old_logps).abs() * experience.mask
    assert float(difference.max()) < 1e-5
    if packing == "auto":  # each of the 3 prompts once in its segment: 2 of its 3 copies not run
        shared = module.sequence_batch(experience.sequences, packing).packed
        plain = module.sequence_batch(experience.sequences, True).packed
        prompt_cells = sum(len(p) for p in PROMPTS)
        assert shared.shared_prompts and shared.prompt_owner.tolist() == [0, 0, 0, 3, 3, 3, 6, 6, 6]
        assert int((plain.sequence_index >= 0).sum() - (shared.sequence_index >= 0).sum()) == 2 * prompt_cells


def test_kl_in_the_reward_and_the_score_on_the_stop_token_with_pad_eos():
    """Per-token rewards are -beta k1 on every token and the score on each completion's stop token, not on the
    padding after it, which a pad = EOS tokenizer makes look the same (here written out: completions that stop,
    followed by padding that is the EOS id again)."""
    from lightning_pref.generation import Completions
    from lightning_pref.rollout import Rollout

    module = _module(estimator={"class_path": "rloo"}, samples_per_prompt=2, kl={"coef": 0.3})
    module.tokenizer.pad_token = module.tokenizer.eos_token  # pad = EOS, as SmolLM2, Qwen, Llama 3
    module.configure_model()
    torch.manual_seed(0)
    for p in module.policy.parameters():  # move the policy off the reference so the KL is not 0
        p.data.add_(0.05 * torch.randn_like(p))
    eos = module.tokenizer.eos_token_id
    ids = torch.tensor([[40, 41, eos, eos, eos], [50, 51, 52, 53, 54], [60, eos, eos, eos, eos], [70, 71, 72, eos, eos]])
    lengths = torch.tensor([3, 5, 2, 4])  # rows 0, 2, 3 stopped on EOS; the EOS ids after it are padding
    prompts = [list(b"Hello there"), list(b"Why")]
    sequences = [(prompts[n // 2], ids[n, : lengths[n]].tolist()) for n in range(4)]
    with torch.no_grad():
        old = module.policy.token_logps(module.sequence_batch(sequences, False)).logps
    completions = Completions([["a", "b"], ["c", "d"]], ids, lengths, lengths < 5, [eos], old)
    scores = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
    experience = module.experience(Rollout(prompts, ["a", "b"], completions, scores, 0.0), packing=False)
    k1 = (experience.old_logps - experience.reference_logps) * experience.mask
    rows = torch.arange(4)
    assert torch.equal(experience.mask.sum(-1), lengths)
    non_score = experience.rewards.clone()
    non_score[rows, lengths - 1] -= scores.flatten()  # the score sits on the last real token, the stop token
    torch.testing.assert_close(non_score.sum(-1), -0.3 * k1.sum(-1))  # sums to -beta sum(log pi - log pi_ref)
    torch.testing.assert_close(non_score, -0.3 * k1)  # -beta k1 on every token
    assert float(k1.abs().sum()) > 0
    assert (experience.rewards * ~experience.mask).abs().sum() == 0  # nothing on the padding after a stop


def test_option_checks_name_the_option():
    with pytest.raises(UserInputError, match="samples_per_prompt"):
        _module(estimator={"class_path": "grpo"}, samples_per_prompt=1)
    with pytest.raises(UserInputError, match="model.critic"):
        _module(estimator={"class_path": "grpo"}, critic={"vf_coef": 0.1})
    with pytest.raises(UserInputError, match="model.kl.coef"):
        _module(kl={"coef": -1.0})
    with pytest.raises(UserInputError, match="model.kl.target"):
        _module(kl={"coef": 0.0, "target": 6.0})
    with pytest.raises(UserInputError, match="model.clip"):
        _module(clip=1.5)
    with pytest.raises(UserInputError, match="precomputed"):
        _module(reference_mode="precomputed")
    with pytest.raises(UserInputError, match="kl.coef: 0"):
        _module(reference_mode="none")
    with pytest.raises(UserInputError, match="model.judge: required"):
        PolicyGradientModule(TINY, tokenizer="byte")
    greedy = _module(generation=GenerationOptions(max_new_tokens=4))  # fine to evaluate with, not to train
    with pytest.raises(UserInputError, match="do_sample"):
        greedy.on_fit_start()


def test_critic_from_an_exported_reward_model_starts_at_its_score(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from lightning_pref.reward import RewardModule
    from lightning_pref.reward.export import save_reward_model
    from lightning_pref.reward.module import RewardScorer

    reward = RewardModule(TINY, tokenizer="byte")
    reward.configure_model()
    torch.nn.init.normal_(reward.scorer.head.weight, std=0.5)  # a head that says something
    save_reward_model(reward, tmp_path / "rm")
    module = _module(critic={"model": str(tmp_path / "rm")})
    module.configure_model()
    exported = RewardScorer(AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval())
    ids = torch.tensor([[5, 9, 12, 40, 41, 1], [7, 7, 8, 1, 0, 0]])
    mask = (torch.arange(6) < torch.tensor([[6], [4]])).long()
    with torch.no_grad():
        torch.testing.assert_close(module.critic(ids, mask), exported(ids, mask))
        assert exported(ids, mask).abs().min() > 0


@pytest.mark.parametrize(("setting", "method", "expected"), [
    (True, "uniform", [True] * 3 + [False]), (2, "uniform", [True, False, True, False]),
    (2, "block", [True, True, False, False])])
def test_gradient_checkpointing_reaches_the_policy_and_the_critic(setting, method, expected):
    """The critic is loaded apart from the policy: it recomputes the same layers (``2``: one decoder layer in
    2, or the bottom 2; never the top one)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    module = _module(policy={**TINY, "num_hidden_layers": 4}, gradient_checkpointing=setting,
                     gradient_checkpointing_method=method)
    module.configure_model()
    for model in (module.policy, module.critic):
        layers = [m.gradient_checkpointing for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        assert layers == expected


def test_critic_of_a_policy_given_as_a_directory_has_one_value_head(tmp_path):
    """The critic built from the policy's body when the policy is a saved model (a pretrained config keeps its own
    two labels unless told otherwise: the values then had two columns and the first rollout crashed)."""
    from lightning_pref.models import load_configured, load_tokenizer

    load_configured(TINY, "model.policy", load_tokenizer("byte")).save_pretrained(tmp_path / "policy")
    module = PolicyGradientModule(str(tmp_path / "policy"), tokenizer="byte", judge=NoShoutingJudge(),
                                  generation=GenerationOptions(max_new_tokens=4, do_sample=True),
                                  optimizer=partial(torch.optim.AdamW, lr=1e-3))
    module.configure_model()
    assert module.critic.head.out_features == 1
    ids = torch.tensor([[5, 9, 12, 40, 41, 1]])
    mask, response = torch.ones_like(ids), torch.tensor([[0, 0, 0, 1, 1, 1]])
    values, rows = module.critic.values(ids, mask, response)
    assert values.shape == (3,) and torch.equal(values, torch.zeros(3)) and rows.tolist() == [0, 0, 0]


def test_critic_of_smollm2_given_as_a_directory_values_real_text_from_zero(smollm2):
    """The critic-from-a-directory fix on the real model: SmolLM2's body with a one-label head, zero at the start,
    one value per completion token of a real prompt (its own tokenizer, its chat template)."""
    module = PolicyGradientModule(str(smollm2), judge=NoShoutingJudge(),
                                  generation=GenerationOptions(max_new_tokens=4, do_sample=True),
                                  optimizer=partial(torch.optim.AdamW, lr=1e-6))
    module.configure_model()
    assert module.critic.head.out_features == 1
    prompt = module.tokenizer.apply_chat_template([{"role": "user", "content": "How do I boil an egg?"}],
                                                  add_generation_prompt=True, tokenize=False)
    ids = module.tokenizer(prompt + "Put it in water.", add_special_tokens=False, return_tensors="pt")["input_ids"]
    response = torch.zeros_like(ids)
    response[:, len(module.tokenizer(prompt, add_special_tokens=False)["input_ids"]):] = 1
    with torch.no_grad():
        values, rows = module.critic.values(ids, torch.ones_like(ids), response)
    assert values.shape == (int(response.sum()),) and torch.equal(values, torch.zeros_like(values))


def test_critic_refuses_a_model_with_another_tokenizer(tmp_path, smollm2):
    with pytest.raises(UserInputError, match="another tokenizer"):
        _module(critic={"model": str(smollm2)}).configure_model()


class _Gradients(Callback):
    """The policy's gradient at the first optimizer step (before the step)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.grads:
            self.grads = {n: p.grad.clone() for n, p in pl_module.policy.named_parameters() if p.grad is not None}


def _one_update(module: PolicyGradientModule) -> dict[str, torch.Tensor]:
    dm = PreferenceDataModule(tokenizer=module.tokenizer, batch_size=3, train_data="prompts")
    grads = _Gradients()
    Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, callbacks=[grads]).fit(module, dm)
    return grads.grads


def test_ptx_adds_exactly_gamma_times_the_nll_gradient(tmp_path):
    texts = write_jsonl(tmp_path / "text.jsonl", [{"text": "the quick brown fox"}, {"text": "jumps over it"}])
    options = {"data": str(texts), "coef": 0.5, "batch_size": 2}

    def module(ptx=None) -> PolicyGradientModule:
        torch.manual_seed(0)
        return _module(estimator={"class_path": "grpo"}, samples_per_prompt=2, ptx=ptx)

    with_ptx, without = _one_update(module(options)), _one_update(module())
    nll_model = module(options)
    nll_model.configure_model()
    nll = nll_model.ptx.loss(nll_model.policy, 0, torch.device("cpu"))
    nll.backward()
    for name, p in nll_model.policy.named_parameters():
        torch.testing.assert_close(with_ptx[name] - without[name], 0.5 * p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_ptx_refuses_rows_it_cannot_read(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"other": 1}])
    module = _module(ptx={"data": str(bad)})
    with pytest.raises(UserInputError, match=r"model.ptx.data: .*bad.jsonl:2"):
        module.configure_model()


# ------------------------------------------------------------------------------------------ learning
def _fit_config(name: str, root, *extra: str) -> list[dict]:
    import sys

    from lightning_pref.cli import main

    argv, sys.argv = sys.argv, ["lightning-pref"]
    try:
        main(["fit", "--config", str(REPO / f"configs/{name}.yaml"), "--trainer.default_root_dir", str(root),
              "--progress_bar.refresh_rate", "0", *extra])
    finally:
        sys.argv = argv
    with open(next(root.glob("lightning_logs/version_*/metrics.csv"))) as f:
        return [r for r in csv.DictReader(f) if r.get("train/judge/score")]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ppo", "grpo", "rloo"])
def test_rl_configs_raise_the_judged_score_and_win_over_the_reference(name, tmp_path, capsys):
    import json
    import sys

    from lightning_pref.cli import main

    rows = _fit_config(name, tmp_path)
    scores = [float(r["train/judge/score"]) for r in rows]
    assert sum(scores[-5:]) / 5 > sum(scores[:5]) / 5 + 0.5, scores
    assert all(math.isfinite(float(v)) for r in rows for v in r.values() if v)
    checkpoint = next(tmp_path.glob("lightning_logs/version_*/checkpoints/last.ckpt"))
    argv, sys.argv = sys.argv, ["lightning-pref"]
    try:
        main(["evaluate", "--config", str(REPO / f"configs/{name}.yaml"), "--ckpt_path", str(checkpoint),
              "--judge", "function", "--judge.fn", "lightning_pref.judges.rules:quiet_letters",
              "--data.predict", str(REPO / "lightning_pref/assets/synthetic_val.jsonl"),
              "--trainer.default_root_dir", str(tmp_path)])
    finally:
        sys.argv = argv
    report = json.loads(checkpoint.with_suffix(".evaluation.json").read_text())
    assert report["win_rate"]["value"] >= 0.8, report["win_rate"]


@pytest.mark.slow
def test_resume_mid_run_is_exact(tmp_path):
    """PPO (2 epochs x 2 minibatches a rollout) for 4 rollouts with a checkpoint every 2, and a run resumed from
    the one after rollout 2: the same rollouts (seeded by update count, batch and rank), the same metrics for
    rollouts 3 and 4, the same policy and critic weights, the same KL coefficient."""
    base = ["--trainer.max_steps", "16", "--data.batch_size", "4", "--model.init_args.kl.target", "2.0"]
    _fit_config("ppo", tmp_path / "a", *base, "--checkpoint.every_n_train_steps", "8", "--checkpoint.save_top_k", "-1")
    checkpoints = tmp_path / "a/lightning_logs/version_0/checkpoints"
    resumed = _fit_config("ppo", tmp_path / "b", *base, "--ckpt_path", str(checkpoints / "epoch=0-step=8.ckpt"))
    with open(tmp_path / "a/lightning_logs/version_0/metrics.csv") as f:
        uninterrupted = [r for r in csv.DictReader(f) if r.get("train/judge/score")]
    keys = ("train/judge/score", "train/objective/kl", "train/loss/policy", "train/loss/value", "train/kl_coef")
    assert len(uninterrupted) == 4 and len(resumed) == 2
    for a, b in zip(uninterrupted[2:], resumed, strict=True):
        assert all(a[k] == b[k] for k in keys), (a, b)
    a = torch.load(checkpoints / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "b/lightning_logs/version_0/checkpoints/last.ckpt", weights_only=False)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["kl_state"] == b["kl_state"] and a["kl_state"]["coef"] != 0.05  # the adaptive coefficient moved


def test_an_epoch_bounded_schedule_spans_the_updates_not_the_rollouts(tmp_path):
    """A linear decay over one epoch of 3 rollouts of 4 updates decays over 12 updates (was: over 3, so the
    learning rate was 0 for the last 9)."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"prompt {i}"} for i in range(6)])
    _fit_config("grpo", tmp_path, "--trainer.max_steps", "-1", "--trainer.max_epochs", "1", "--data.train",
                str(prompts), "--data.batch_size", "2", "--model.init_args.generation.max_new_tokens", "4",
                "--model.init_args.scheduler", "lightning_pref.schedules.WarmupDecay",
                "--model.init_args.scheduler.decay", "linear")
    checkpoint = torch.load(next(tmp_path.glob("lightning_logs/version_0/checkpoints/last.ckpt")), weights_only=False)
    schedule = checkpoint["lr_schedulers"][0]
    assert checkpoint["global_step"] == 12 and schedule["total_steps"] == 12
    assert schedule["last_epoch"] == 12 and schedule["_last_lr"][0] == pytest.approx(0.0)  # reached 0 at the end


def test_a_fixed_kl_coefficient_changed_on_resume_is_the_new_one(tmp_path):
    """``kl.coef`` without a target is an option like any other: a resumed run uses the configured value (was: the
    checkpoint's, while the saved config said the new one)."""
    base = ["--data.batch_size", "2", "--model.init_args.generation.max_new_tokens", "4"]
    _fit_config("grpo", tmp_path / "a", *base, "--trainer.max_steps", "4")
    checkpoint = tmp_path / "a/lightning_logs/version_0/checkpoints/last.ckpt"
    rows = _fit_config("grpo", tmp_path / "b", *base, "--trainer.max_steps", "8", "--ckpt_path", str(checkpoint),
                       "--model.init_args.kl.coef", "0.5")
    assert [float(r["train/kl_coef"]) for r in rows] == [0.5]
    resumed = torch.load(tmp_path / "b/lightning_logs/version_0/checkpoints/last.ckpt", weights_only=False)
    assert resumed["kl_state"] == {"coef": 0.5}


def prompt_number(prompt: str, completion: str) -> float:
    """A judge that scores the held-out prompt ("p3" -> 3), whatever the policy wrote (training prompts: 0)."""
    return float(prompt[1:]) if prompt[1:].isdigit() else 0.0


def test_validation_judges_what_the_policy_writes_for_held_out_prompts(tmp_path, capsys):
    """``data.val`` with RL: one completion per held-out prompt, judged, exact means over the epoch (3 prompts in
    batches of 2 and 1: the mean of the batch means would be 2.25). Was: loaded and silently never used. And
    ``validate`` of the checkpoint measures the same, or refuses ``limit_val_batches: 0`` (which the RL configs set)
    instead of measuring nothing."""
    import sys

    from lightning_pref.cli import main

    val = write_jsonl(tmp_path / "val.jsonl", [{"prompt": f"p{i}"} for i in (1, 2, 3)])
    common = ["--model.init_args.judge.init_args.fn", "tests.test_rl:prompt_number", "--data.val", str(val),
              "--data.batch_size", "2", "--model.init_args.generation.max_new_tokens", "4"]
    _fit_config("grpo", tmp_path / "fit", *common, "--trainer.max_steps", "4", "--trainer.limit_val_batches", "1.0",
                "--trainer.val_check_interval", "1", "--trainer.num_sanity_val_steps", "0")
    with open(next((tmp_path / "fit").glob("lightning_logs/version_0/metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/judge/score")]
    assert [float(r["val/judge/score"]) for r in rows] == [2.0]
    assert 1 <= float(rows[0]["val/completions/tokens"]) <= 4
    checkpoint = next((tmp_path / "fit").glob("lightning_logs/version_0/checkpoints/last.ckpt"))
    argv, sys.argv = sys.argv, ["lightning-pref"]
    try:
        validate = ["validate", "--config", str(REPO / "configs/grpo.yaml"), "--ckpt_path", str(checkpoint), *common]
        with pytest.raises(SystemExit) as exit_info:
            main(validate)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            "error: trainer.limit_val_batches: 0 (the on-policy and RL configs set it), so validate would measure "
            "nothing and exit 0; pass --trainer.limit_val_batches 1.0")
        main([*validate, "--trainer.limit_val_batches", "1.0"])
        lines = capsys.readouterr().out.splitlines()
        assert any(line.startswith("validation  val/completions/eos_rate") for line in lines), lines  # was: "at step -1"
    finally:
        sys.argv = argv
    assert [p.name for p in checkpoint.parents[1].glob("validate*")] == ["validate"]  # the refused one left none
    measured = checkpoint.parents[1] / "validate/metrics.csv"
    with open(measured) as f:
        assert [float(r["val/judge/score"]) for r in csv.DictReader(f) if r["val/judge/score"]] == [2.0]
