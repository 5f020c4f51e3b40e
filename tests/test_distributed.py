"""DDP and FSDP2 on CPU with 2 processes (gloo): same trajectory as one process, exact metrics, resume, export."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from lightning_pref.data.synthetic import generate
from tests.support import REPO, write_jsonl

pytestmark = pytest.mark.slow
STRATEGIES = ["ddp", "fsdp2"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "lightning_pref", *args], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _strategy(name: str | None) -> list[str]:
    if name is None:
        return ["--trainer.devices", "1"]
    return ["--config", str(REPO / f"configs/strategy/{name}.yaml"), "--trainer.devices", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("dist")
    records, _ = generate(37, seed=7)
    # 24 training pairs; 13 validation pairs, so 2 processes need one padded duplicate
    return {"train": write_jsonl(tmp / "train.jsonl", records[:24]), "val": write_jsonl(tmp / "val.jsonl", records[24:])}


def _fit(root: Path, data: dict[str, Path], strategy: str | None, batch_size: int, *extra: str) -> None:
    _cli(
        "fit", "--config", str(REPO / "configs/dpo.yaml"), *_strategy(strategy), "--trainer.accelerator", "cpu",
        "--data.train", str(data["train"]), "--data.val", "null", "--data.batch_size", str(batch_size),
        "--trainer.max_steps", "3", "--trainer.log_every_n_steps", "1", "--progress_bar.refresh_rate", "0",
        "--trainer.default_root_dir", str(root), "--trainer.callbacks+=tests.support.RecordLosses",
        f"--trainer.callbacks.directory={root}", *extra,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data) -> dict[str | None, Path]:
    """3 steps with a global batch of 8 pairs: 1 process x 8, and 2 processes x 4 under each strategy."""
    tmp = tmp_path_factory.mktemp("runs")
    roots = {}
    for strategy in [None, *STRATEGIES]:
        roots[strategy] = tmp / (strategy or "single")
        _fit(roots[strategy], data, strategy, 8 if strategy is None else 4)
    return roots


def _last(root: Path, version: int = 0) -> Path:
    return root / f"lightning_logs/version_{version}/checkpoints/last.ckpt"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_loss_trajectory_and_weights_match_single_process(runs, strategy):
    single = json.loads((runs[None] / "losses_rank0.json").read_text())
    ranks = [json.loads((runs[strategy] / f"losses_rank{r}.json").read_text()) for r in (0, 1)]
    global_losses = [(a + b) / 2 for a, b in zip(*ranks, strict=True)]  # equal per-rank batches: the global mean
    assert len(single) == 3
    torch.testing.assert_close(torch.tensor(global_losses), torch.tensor(single), rtol=1e-5, atol=1e-6)
    expected = torch.load(_last(runs[None]), weights_only=False)["state_dict"]
    got = torch.load(_last(runs[strategy]), weights_only=False)["state_dict"]
    assert set(got) == set(expected) and not any(k.startswith("reference.") for k in got)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_report_of_a_distributed_run(runs, tmp_path, strategy):
    """rank 0 wrote the run's metrics.csv and config.yaml: the report has every logged step and the config."""
    pytest.importorskip("matplotlib")
    from lightning_pref.cli import main

    main(["report", str(runs[strategy]), "--output_dir", str(tmp_path)])
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "No config.yaml" not in page and "<td>model.loss</td>" in page
    rows = list(csv.DictReader(open(runs[strategy] / "lightning_logs/version_0/metrics.csv")))
    assert [int(r["step"]) for r in rows if r["train/loss"]] == [0, 1, 2]  # one row per step, not one per rank
    assert (tmp_path / "report_loss.png").is_file()


def test_precomputed_reference_under_ddp_matches_model_mode(runs, data, tmp_path):
    """Each rank looks up the cached reference log-probs of its own (shuffled) examples."""
    root = tmp_path / "precomputed"
    _fit(root, data, "ddp", 4, "--model.reference_mode", "precomputed",
         f"--model.reference_cache_dir={tmp_path / 'cache'}")
    for rank in (0, 1):
        expected = json.loads((runs["ddp"] / f"losses_rank{rank}.json").read_text())
        got = json.loads((root / f"losses_rank{rank}.json").read_text())
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1


def _outside_run(ckpt: Path, root: Path) -> Path:
    """A copy of ``ckpt`` in ``root``: a command on it logs under ``root`` (on the checkpoint in its run, it would
    log beside that run, shared by every test using it)."""
    root.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(ckpt, root / "model.ckpt"))


def _validate(root: Path, data, strategy: str | None, ckpt: Path) -> dict[str, float]:
    _cli(
        "validate", "--config", str(REPO / "configs/dpo.yaml"), *_strategy(strategy), "--trainer.accelerator", "cpu",
        "--data.train", str(data["train"]), "--data.val", str(data["val"]), "--data.batch_size", "4",
        "--trainer.default_root_dir", str(root), "--ckpt_path", str(_outside_run(ckpt, root)),
        "--progress_bar.refresh_rate", "0",
    )
    (row,) = [r for r in csv.DictReader(open(root / "lightning_logs/version_0/metrics.csv")) if r["val/loss"]]
    return {k: float(v) for k, v in row.items() if k.startswith("val/")}


@pytest.fixture(scope="module")
def single_validation(runs, data, tmp_path_factory) -> dict[str, float]:
    return _validate(tmp_path_factory.mktemp("single_validation"), data, None, _last(runs[None]))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_validation_metrics_equal_single_process(runs, data, tmp_path, strategy, single_validation):
    """13 pairs on 2 processes: the sampler pads one duplicate, which must not count."""
    single = single_validation
    multi = _validate(tmp_path / strategy, data, strategy, _last(runs[None]))
    assert single.keys() == multi.keys() and "val/rewards/accuracies" in single
    for key, value in single.items():
        assert multi[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_checkpoint_resumes_and_exports(runs, data, tmp_path, strategy):
    root = runs[strategy]
    _fit(root, data, strategy, 4, "--trainer.max_steps", "5", "--ckpt_path", "last")
    resumed = torch.load(_last(root, version=1), weights_only=False)
    assert resumed["global_step"] == 5
    out = tmp_path / "exported"
    _cli("export", "--ckpt_path", str(_last(root, version=1)), "--output_dir", str(out))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(model.model.embed_tokens.weight,
                               resumed["state_dict"]["policy.model.model.embed_tokens.weight"])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_kto_kl_baseline_distributed(data, tmp_path, strategy):
    """KTO's KL rows (scored on the cached prompts inside the sharded forward under FSDP2) give a finite z0."""
    root = tmp_path / "kto"
    _cli(
        "fit", "--config", str(REPO / "configs/kto.yaml"), *_strategy(strategy), "--trainer.accelerator", "cpu",
        "--data.train", str(data["train"]), "--data.val", str(data["val"]), "--data.batch_size", "3",
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1",
        "--trainer.default_root_dir", str(root), "--progress_bar.refresh_rate", "0",
    )
    rows = list(csv.DictReader(open(root / "lightning_logs/version_0/metrics.csv")))
    kl = [float(r["train/kl"]) for r in rows if r.get("train/kl")]
    assert kl and all(v >= 0 and v == v for v in kl)
    assert any(r.get("val/rewards/accuracies") for r in rows)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_nonfinite_skip_and_export_at_the_end_of_a_sharded_fit(data, tmp_path, strategy):
    """A non-finite loss on one rank only, with on_nonfinite: skip, keeps the ranks' collectives in step (no hang,
    no 'returning None' error); ExportPolicy at the end gathers the full policy on rank 0 (under FSDP2 saving on
    rank 0 alone used to hang or write shards)."""
    root, out = tmp_path / "run", tmp_path / "exported"
    result = _cli(
        "fit", "--config", str(REPO / "configs/dpo.yaml"), *_strategy(strategy), "--trainer.accelerator", "cpu",
        "--data.train", str(data["train"]), "--data.val", "null", "--data.batch_size", "4",
        "--trainer.max_steps", "3", "--trainer.default_root_dir", str(root), "--progress_bar.refresh_rate", "0",
        "--model.loss", "tests.support.NaNAtCall", "--model.loss.at", "1", "--model.loss.rank", "1",
        "--model.on_nonfinite", "skip", "--trainer.callbacks+=lightning_pref.export.ExportPolicy",
        f"--trainer.callbacks.output_dir={out}",
    )
    assert "non-finite loss at step 1" in result.stderr and "batch skipped" in result.stderr
    last = torch.load(_last(root), weights_only=False)
    assert last["global_step"] == 3
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    policy = {k.removeprefix("policy.model."): v for k, v in last["state_dict"].items() if k.startswith("policy.")}
    assert exported.keys() == policy.keys()
    for key, value in policy.items():
        torch.testing.assert_close(exported[key], value, msg=key)


def test_fsdp2_refuses_a_checkpoint_missing_a_policy_key(runs, data, tmp_path):
    """FSDP2 loads weights itself, non-strictly before; now only the frozen reference's keys may be missing."""
    checkpoint = torch.load(_last(runs[None]), weights_only=False)
    del checkpoint["state_dict"]["policy.model.model.norm.weight"]
    broken = tmp_path / "broken.ckpt"
    torch.save(checkpoint, broken)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "lightning_pref", "validate", "--config", str(REPO / "configs/dpo.yaml"),
         *_strategy("fsdp2"), "--trainer.accelerator", "cpu", "--data.train", str(data["train"]),
         "--data.val", str(data["val"]), "--trainer.default_root_dir", str(tmp_path / "v"), "--ckpt_path", str(broken),
         "--progress_bar.refresh_rate", "0"],
        env=env, capture_output=True, text=True,
    )
    assert result.returncode != 0
    assert "missing policy.model.model.norm.weight" in result.stderr


def test_predict_under_ddp_writes_each_prompt_once_in_input_order(runs, data, tmp_path):
    """13 prompts on 2 processes: the sampler pads a duplicate in; each prompt is written once, in file order,
    with the single-process completions (greedy)."""
    written = {}
    for strategy in (None, "ddp"):
        root = tmp_path / (strategy or "single")
        checkpoint = _outside_run(_last(runs[None]), root)
        _cli("predict", "--config", str(REPO / "configs/dpo.yaml"), *_strategy(strategy), "--trainer.accelerator",
             "cpu", "--ckpt_path", str(checkpoint), "--data.predict", str(data["val"]),
             "--data.batch_size", "3", "--model.generation.max_new_tokens", "6", "--trainer.default_root_dir",
             str(root), "--progress_bar.refresh_rate", "0")
        written[strategy] = [json.loads(x) for x in (root / "lightning_logs/version_0/predictions.jsonl").open()]
    prompts = [json.loads(x)["prompt"] for x in data["val"].open()]
    assert [r["prompt"] for r in written["ddp"]] == prompts
    assert written["ddp"] == written[None]


def test_reward_model_validation_metrics_equal_single_process(data, tmp_path):
    """A reward model's exact metrics (means, standard deviations from summed moments) over 2 processes, on the
    seeded initial model (what is measured is the reduction, not the model)."""
    values = {}
    for strategy in (None, "ddp"):
        out = tmp_path / (strategy or "single")
        _cli("validate", "--config", str(REPO / "configs/reward.yaml"), *_strategy(strategy), "--trainer.accelerator",
             "cpu", "--data.train", str(data["train"]), "--data.val", str(data["val"]), "--data.batch_size", "4",
             "--trainer.default_root_dir", str(out), "--progress_bar.refresh_rate", "0")
        (row,) = [r for r in csv.DictReader(open(out / "lightning_logs/version_0/metrics.csv")) if r["val/loss"]]
        values[strategy] = {k: float(v) for k, v in row.items() if k.startswith("val/")}
    assert "val/rewards/chosen_std" in values[None] and values[None].keys() == values["ddp"].keys()
    for key, value in values[None].items():
        # a std from moments cancels E[x^2] - E[x]^2: the scores' fp32 differences between batchings (~1e-7)
        # come out ~1e-4 relative when the spread is small next to the mean
        rel = 1e-3 if key.endswith("_std") else 1e-5
        assert values["ddp"][key] == pytest.approx(value, rel=rel, abs=1e-6), key


def test_online_under_ddp_each_rank_samples_its_own_prompts(tmp_path):
    """On-policy DPO on 2 processes x 4 prompts: each step the ranks generate for disjoint prompts which together
    are a single process's batch of 8 (the sampler's order), and both train on finite losses."""
    from lightning_pref.data.sampler import TrainSampler

    prompts = {}
    for strategy, batch_size in (("ddp", 4),):
        root = tmp_path / strategy
        _cli("fit", "--config", str(REPO / "configs/online_dpo.yaml"), *_strategy(strategy), "--trainer.accelerator",
             "cpu", "--data.batch_size", str(batch_size), "--trainer.max_steps", "2", "--progress_bar.refresh_rate",
             "0", "--trainer.default_root_dir", str(root), "--trainer.callbacks+=tests.support.RecordPrompts",
             f"--trainer.callbacks.directory={root}", "--trainer.callbacks+=tests.support.RecordLosses",
             f"--trainer.callbacks.directory={root}")
        ranks = range(2 if strategy else 1)
        prompts[strategy] = [json.loads((root / f"prompts_rank{r}.json").read_text()) for r in ranks]
        losses = [json.loads((root / f"losses_rank{r}.json").read_text()) for r in ranks]
        assert all(len(x) == 2 and all(v == v and abs(v) < 1e3 for v in x) for x in losses)
    rank0, rank1 = prompts["ddp"]
    order = list(TrainSampler(range(2048), seed=0))  # the bundled set's 2,048 prompts, one process
    for step, single in enumerate([order[:8], order[8:16]]):
        assert not set(rank0[step]) & set(rank1[step])
        assert sorted(rank0[step] + rank1[step]) == sorted(single)


def test_policy_gradient_under_ddp_makes_the_single_process_updates(tmp_path):
    """REINFORCE++ (advantages normalized over the global batch) with the token-mean loss over the global
    minibatch: 2 processes x 4 prompts make the updates of 1 process x 8, given the same completions (greedy
    rollouts, tests.support.GreedyRollouts), so the policies end equal."""
    weights = {}
    for strategy, batch_size in ((None, 8), ("ddp", 4)):
        root = tmp_path / (strategy or "single")
        _cli("fit", "--config", str(REPO / "configs/grpo.yaml"), *_strategy(strategy), "--trainer.accelerator", "cpu",
             "--model.class_path", "tests.support.GreedyRollouts", "--model.init_args.estimator", "reinforce_pp",
             "--model.init_args.samples_per_prompt", "1", "--model.init_args.minibatches", "1",
             "--data.batch_size", str(batch_size), "--trainer.max_steps", "4", "--progress_bar.refresh_rate", "0",
             "--trainer.default_root_dir", str(root))
        state = torch.load(_last(root), map_location="cpu", weights_only=False)["state_dict"]
        weights[strategy] = {k: v for k, v in state.items() if k.startswith("policy.")}
    assert weights[None].keys() == weights["ddp"].keys()
    moved = torch.load(_last(tmp_path / "single"), weights_only=False)  # the policy trained (else the test is void)
    assert moved["global_step"] == 4
    # Adam divides by the gradients' own scale, so rounding-level gradient differences move a weight by a small
    # fraction of the learning rate (1e-3 x 4 updates): 1e-5 is 0.25% of the distance the weights travelled.
    for key, value in weights[None].items():
        torch.testing.assert_close(weights["ddp"][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_a_run_takes_its_process_group_down(data, tmp_path, monkeypatch):
    """The CLI destroys the process group a distributed run set up, so that a script's next command starts
    afresh."""
    from lightning_pref.cli import main

    monkeypatch.chdir(tmp_path)
    # Lightning sets MASTER_PORT & co. in this process: restored after, or later tests' runs all take that one port.
    with mock.patch.dict(os.environ):
        distributed = main([
            "fit", "--config", str(REPO / "configs/dpo.yaml"), "--config", str(REPO / "configs/strategy/ddp.yaml"),
            "--trainer.devices", "1", "--trainer.accelerator", "cpu", "--data.train", str(data["train"]),
            "--data.val", "null", "--data.batch_size", "4", "--trainer.max_steps", "1",
            "--progress_bar.refresh_rate", "0", "--trainer.default_root_dir", str(tmp_path),
        ])
    assert (tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt").is_file()  # the run ran to its end
    assert not torch.distributed.is_initialized()
    assert distributed  # so the command ends as a distributed run's must (cli.console)


def test_a_distributed_command_still_runs_exit_handlers_and_flushes_on_every_rank(data, tmp_path):
    """The command ends a 2-process run without finalizing the interpreter (``cli.console``): its exit handlers
    and unflushed output are not lost, on either rank."""
    result = _cli(
        "fit", "--config", str(REPO / "configs/dpo.yaml"), *_strategy("ddp"), "--trainer.accelerator", "cpu",
        "--data.train", str(data["train"]), "--data.val", "null", "--data.batch_size", "4",
        "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path), "--progress_bar.refresh_rate", "0",
        "--trainer.callbacks+=tests.support.PrintAtExit",
    )
    for rank in (0, 1):
        assert f"exit handler rank {rank}" in result.stdout
    assert (tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt").is_file()
