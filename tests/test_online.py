"""On-policy training: pairs from the policy's own samples, labelled by a judge, trained with any pairwise loss."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from lightning_pref import OnPolicyModule, PreferenceDataModule
from lightning_pref.cli import main
from lightning_pref.data.collate import PreferenceCollator
from lightning_pref.generation import GenerationOptions
from lightning_pref.judges import FunctionJudge
from lightning_pref.online import pick_pairs
from tests.support import REPO, TINY, write_jsonl

ONLINE = str(REPO / "configs/online_dpo.yaml")


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightning-pref"])


def _module(**kwargs) -> OnPolicyModule:
    kwargs.setdefault("judge", FunctionJudge("lightning_pref.judges.rules:quiet_letters"))
    kwargs.setdefault("generation", GenerationOptions(max_new_tokens=8, do_sample=True))
    module = OnPolicyModule(policy=TINY, tokenizer="byte", **kwargs)
    module.configure_model()
    return module


def _metrics(root) -> list[dict]:
    (path,) = root.glob("lightning_logs/version_0/metrics.csv")
    return list(csv.DictReader(open(path)))


def test_the_judges_ordering_picks_the_pair_and_ties_are_dropped():
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.3, 0.3], [1.0, 0.0, 0.2], [0.5, 0.6, 0.55]])
    assert pick_pairs(scores) == [(0, 1, 0), (2, 0, 1), (3, 1, 0)]  # prompt 1: a tie, dropped
    assert pick_pairs(scores, min_gap=0.2) == [(0, 1, 0), (2, 0, 1)]  # prompt 3's gap 0.1 is too small


def test_pairs_from_generations_are_the_batch_the_offline_pipeline_builds(tmp_path):
    """The kept pairs, written as a preference file and loaded as offline data, collate to the same batch; the
    chosen completion is the one the judge scored highest."""
    module = _module()
    prompts = [f"User: say something {i}\nAssistant:" for i in range(6)]
    ids = [module.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    examples, metrics = module.sample_pairs(ids, prompts, seed=3)
    again, _ = module.sample_pairs(ids, prompts, seed=3)
    assert [(e.chosen, e.rejected) for e in again] == [(e.chosen, e.rejected) for e in examples]  # seeded
    different, _ = module.sample_pairs(ids, prompts, seed=4)
    assert [(e.chosen, e.rejected) for e in different] != [(e.chosen, e.rejected) for e in examples]
    assert int(metrics["pairs"]) == len(examples) > 0
    decode = module.tokenizer.decode
    texts = [(decode(e.chosen[:-1]), decode(e.rejected[:-1])) for e in examples]  # minus the EOS appended once
    judge = FunctionJudge("lightning_pref.judges.rules:quiet_letters")
    for e, (chosen, rejected) in zip(examples, texts, strict=True):
        assert judge.score([prompts[e.index]] * 2, [chosen, rejected]) == sorted(
            judge.score([prompts[e.index]] * 2, [chosen, rejected]), reverse=True)
    rows = [{"prompt": prompts[e.index], "chosen": c, "rejected": r} for e, (c, r) in zip(examples, texts, strict=True)]
    dm = PreferenceDataModule(train=str(write_jsonl(tmp_path / "pairs.jsonl", rows)), tokenizer=module.tokenizer,
                              batch_size=len(rows), max_length=512, cache=False)
    dm.setup("fit")
    collate = PreferenceCollator(module.tokenizer.pad_token_id)
    offline = collate([dm.datasets["train"][i] for i in range(len(rows))])
    online = collate(examples)
    assert torch.equal(online.input_ids, offline.input_ids)
    assert torch.equal(online.response_mask, offline.response_mask)


def test_online_needs_sampling_and_a_pairwise_loss():
    from lightning_pref.errors import UserInputError
    from lightning_pref.losses import KTOLoss

    greedy = _module(generation=GenerationOptions(max_new_tokens=4))  # fine to evaluate with, not to train
    with pytest.raises(UserInputError, match="do_sample"):
        greedy.on_fit_start()
    with pytest.raises(UserInputError, match="pairwise loss"):
        _module(loss=KTOLoss())
    with pytest.raises(UserInputError, match="samples_per_prompt"):
        _module(samples_per_prompt=1)


@pytest.fixture(scope="module")
def online_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("online")
    import sys

    argv, sys.argv = sys.argv, ["lightning-pref"]
    try:
        # 24 steps at a higher learning rate than the config's: sampling from every token (no top-50 truncation)
        # explores more, so a short run needs larger steps to learn the rule
        main(["fit", "--config", ONLINE, "--trainer.max_steps", "24", "--trainer.log_every_n_steps", "1",
              "--trainer.default_root_dir", str(tmp), "--data.batch_size", "8", "--progress_bar.refresh_rate", "0",
              "--model.init_args.optimizer.init_args.lr", "0.003"])
    finally:
        sys.argv = argv
    return tmp


def test_online_run_logs_what_the_judge_saw(online_run):
    rows = [r for r in _metrics(online_run) if r["train/judge/score"]]
    assert len(rows) == 24
    for key in ("judge/score", "judge/ties", "completions/eos_rate", "completions/tokens",
                "generation/tokens_per_s", "loss", "rewards/accuracies"):
        assert all(r[f"train/{key}"] != "" for r in rows), key


def test_an_online_run_raises_the_judged_success_of_what_the_policy_writes(online_run, tmp_path):
    """Measured by generation: the trained policy against its reference (the initial policy) on held-out
    prompts, judged by the same rule."""
    (last,) = online_run.glob("lightning_logs/version_0/checkpoints/last.ckpt")
    main(["evaluate", "--config", ONLINE, "--ckpt_path", str(last), "--trainer.default_root_dir", str(tmp_path),
          "--data.val", str(REPO / "lightning_pref/assets/synthetic_val.jsonl"), "--judge", "function",
          "--judge.fn", "lightning_pref.judges.rules:quiet_letters", "--progress_bar.refresh_rate", "0"])
    report = json.loads(last.with_suffix(".evaluation.json").read_text())
    assert report["policy"]["score"]["low"] > report["reference"]["score"]["high"]  # intervals apart
    assert report["win_rate"]["value"] > 0.8


def test_online_resume_is_exact(tmp_path):
    """4 steps with a checkpoint every 2, and a run resumed from the step-2 checkpoint: the same samples (seeded
    per step, batch and rank), the same losses for steps 2 and 3, the same weights."""
    base = ["fit", "--config", ONLINE, "--trainer.log_every_n_steps", "1", "--data.batch_size", "4",
            "--progress_bar.refresh_rate", "0", "--trainer.max_steps", "4", "--trainer.callbacks+=tests.support.RecordLosses"]
    main([*base, "--trainer.default_root_dir", str(tmp_path / "a"), f"--trainer.callbacks.directory={tmp_path / 'a'}",
          "--checkpoint.every_n_train_steps", "2", "--checkpoint.save_top_k", "-1"])
    checkpoints = tmp_path / "a/lightning_logs/version_0/checkpoints"
    main([*base, "--trainer.default_root_dir", str(tmp_path / "b"), f"--trainer.callbacks.directory={tmp_path / 'b'}",
          "--ckpt_path", str(checkpoints / "epoch=0-step=2.ckpt")])
    losses = json.loads((tmp_path / "a/losses_rank0.json").read_text())
    resumed = json.loads((tmp_path / "b/losses_rank0.json").read_text())
    assert len(losses) == 4 and resumed == losses[2:]
    a = torch.load(checkpoints / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "b/lightning_logs/version_0/checkpoints/last.ckpt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("loss", ["ipo", "hinge", "simpo"])
def test_every_pairwise_loss_trains_online(tmp_path, loss):
    reference = ["--model.init_args.reference_mode", "none"] if loss == "simpo" else []
    main(["fit", "--config", ONLINE, "--model.init_args.loss", loss, *reference, "--trainer.max_steps", "2",
          "--trainer.log_every_n_steps", "1", "--data.batch_size", "4", "--trainer.default_root_dir", str(tmp_path),
          "--progress_bar.refresh_rate", "0"])
    rows = [r for r in _metrics(tmp_path) if r["train/loss"]]
    assert len(rows) == 2 and all(float(r["train/loss"]) == float(r["train/loss"]) for r in rows)


def test_iterative_rounds_write_pairs_and_resume_in_their_round(tmp_path):
    """Rounds of 8 prompts, one epoch each: round_0.jsonl, round_1.jsonl ... in the run directory, the next one
    sampled at each epoch's end but the last (was: one more round after the last epoch, sampled and judged for
    nothing); the round files go in checkpoints, and a resumed run trains its round's file."""
    base = ["fit", "--config", ONLINE, "--model.init_args.mode", "iterative", "--model.init_args.round_prompts", "8",
            "--trainer.reload_dataloaders_every_n_epochs", "1", "--trainer.max_steps", "-1", "--data.batch_size", "4",
            "--trainer.default_root_dir", str(tmp_path), "--progress_bar.refresh_rate", "0"]
    main([*base, "--trainer.max_epochs", "2", "--checkpoint.save_top_k", "-1"])
    run = tmp_path / "lightning_logs/version_0"
    rounds = sorted(p.name for p in run.glob("round_*.jsonl"))
    assert rounds == ["round_0.jsonl", "round_1.jsonl"]  # round 1 was ready at epoch 0's end; none after the last
    records = [json.loads(x) for x in (run / "round_0.jsonl").open()]
    assert records and all(r["chosen_score"] > r["rejected_score"] for r in records)
    checkpoint = torch.load(run / "checkpoints/epoch=0-step=2.ckpt", weights_only=False)
    assert checkpoint["epoch"] == 0 and set(checkpoint["callbacks"]["IterativeRounds"]["round_files"]) == {0, 1}
    main([*base, "--trainer.max_epochs", "3", "--ckpt_path", str(run / "checkpoints/epoch=0-step=2.ckpt")])
    # resumes in round 1, with the interrupted run's file
    resumed = tmp_path / "lightning_logs/version_1"
    assert not (resumed / "round_1.jsonl").exists()  # round 1's file came from the interrupted run
    assert (resumed / "round_2.jsonl").exists() and not (resumed / "round_3.jsonl").exists()


def test_a_step_where_every_prompt_tied_reports_no_loss_or_accuracy(tmp_path, capsys):
    """Every completion scores the same: no pair is kept, the step still runs (weight 0) and logs its judge
    metrics, but no loss or reward accuracy that would read as if a pair had been learnt; a run of nothing but
    such steps ends with one line saying the policy is unchanged (was: exit 0, as if it had trained)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", ONLINE, "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1",
              "--data.batch_size", "4", "--trainer.default_root_dir", str(tmp_path), "--progress_bar.refresh_rate",
              "0", "--model.init_args.judge.init_args.fn", "tests.support:constant_score"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: model.judge: no step of this run kept a pair (2 rollouts: every prompt's samples scored the same), so "
        "the policy is unchanged; check that the judge tells completions apart (train/judge/score, train/judge/ties "
        "in the logs)")
    rows = [r for r in _metrics(tmp_path) if r.get("train/judge/score")]
    assert len(rows) == 2
    assert all(float(r["train/judge/ties"]) == 1.0 and float(r["train/pairs"]) == 0.0 for r in rows)
    assert all(r.get("train/loss", "") == "" and r.get("train/rewards/accuracies", "") == "" for r in rows)
