"""Exact resume after SIGKILL, and atomic checkpoint writes."""

from __future__ import annotations

import csv
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_pref.data.synthetic import generate
from tests.support import REPO, write_jsonl


def _fit(root: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [
        "fit", "--config", str(REPO / "configs/dpo.yaml"), "--data.train", str(data), "--data.val", "null",
        "--data.batch_size", "4", "--trainer.max_steps", "10",
        "--checkpoint.every_n_train_steps", "3", "--trainer.log_every_n_steps", "1",
        "--progress_bar.refresh_rate", "0", "--trainer.default_root_dir", str(root), *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lightning_pref", *args], env=env, capture_output=True, text=True)


def _losses(metrics: Path) -> dict[str, str]:
    return {r["step"]: r["train/loss"] for r in csv.DictReader(open(metrics)) if r["train/loss"]}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, Path]:
    """The data, and the root of the uninterrupted 10-step run on it."""
    tmp = tmp_path_factory.mktemp("resume")
    data = write_jsonl(tmp / "pairs.jsonl", generate(24, seed=2)[0])
    full = _fit(tmp / "full", data)
    assert full.returncode == 0, full.stderr[-2000:]
    return data, tmp / "full"


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [4, 7], ids=["mid-epoch", "after-epoch-end"])
def test_resume_after_sigkill_is_exact(tmp_path, kill_at, uninterrupted):
    """24 pairs / batch 4 = 6 batches an epoch; checkpoints every 3 steps. Killed at step 4 the run resumes
    from step 3 (mid-epoch); killed at step 7 it resumes from step 6 (an epoch boundary)."""
    data, full_root = uninterrupted

    killed = _fit(tmp_path / "killed", data, "--trainer.callbacks+=tests.support.KillAtStep",
                  "--trainer.callbacks.step", str(kill_at))
    assert killed.returncode == -9  # SIGKILL: no cleanup, no final checkpoint
    resumed = _fit(tmp_path / "killed", data, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    expected = torch.load(full_root / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=False)
    got = torch.load(tmp_path / "killed/lightning_logs/version_1/checkpoints/last.ckpt", weights_only=False)
    assert got["global_step"] == expected["global_step"] == 10  # the step after the last every_n_train_steps
    for key, value in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), key
    reference_losses = _losses(full_root / "lightning_logs/version_0/metrics.csv")
    resumed_losses = _losses(tmp_path / "killed/lightning_logs/version_1/metrics.csv")
    assert resumed_losses and all(reference_losses[step] == loss for step, loss in resumed_losses.items())
    # nothing of the interrupted run was overwritten
    assert (tmp_path / "killed/lightning_logs/version_0/checkpoints/last.ckpt").is_file()


def test_interrupted_checkpoint_write_leaves_previous_file_intact(tmp_path, monkeypatch):
    """Lightning writes checkpoints through an fsspec transaction (a temporary file, moved into place at the end).
    A write that dies half way through leaves the previous ``last.ckpt`` exactly as it was."""
    from fsspec.implementations.local import LocalFileOpener
    from lightning.fabric.utilities.cloud_io import _atomic_save

    target = tmp_path / "last.ckpt"
    _atomic_save({"step": 1}, target)
    before = target.read_bytes()
    real_write = LocalFileOpener.write

    def dying_write(self, data):
        real_write(self, data[: len(data) // 2])  # half the bytes reach the disk, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(LocalFileOpener, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        _atomic_save({"step": 2, "big": torch.zeros(100_000)}, target)
    monkeypatch.setattr(LocalFileOpener, "write", real_write)
    assert target.read_bytes() == before
    assert torch.load(target, weights_only=False) == {"step": 1}


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    """LightningCLI warns when given args while sys.argv holds pytest's own flags."""
    monkeypatch.setattr("sys.argv", ["lightning-pref"])


class _Chosen(Exception):
    """Raised where LightningCLI would start reading the chosen checkpoint (the test's checkpoints hold no weights)."""


def _chosen(monkeypatch, argv: list[str]) -> str | None:
    """The checkpoint ``--ckpt_path last`` resolves to, without running the command."""
    from lightning_pref.cli import main
    from lightning_pref.trainer_cli import LightningPrefCLI

    def stop(cli):
        raise _Chosen(cli.config[cli.config.subcommand].ckpt_path)

    monkeypatch.setattr(LightningPrefCLI, "_parse_ckpt_path", stop)
    with pytest.raises(_Chosen) as chosen:
        main(argv)
    return chosen.value.args[0]


def _fake_run(log_dir: Path, loss: str, **init_args) -> Path:
    """A run directory whose last.ckpt holds only the hyperparameters of configs/dpo.yaml's policy and ``loss``."""
    import yaml

    policy = yaml.safe_load((REPO / "configs/dpo.yaml").read_text())["model"]["policy"]
    path = log_dir / "checkpoints/last.ckpt"
    path.parent.mkdir(parents=True)
    (log_dir / "config.yaml").write_text("{}\n")
    torch.save({"hyper_parameters": {"policy": policy, "loss": {"class_path": loss, "init_args": init_args}}}, path)
    return path


DPO, IPO = "lightning_pref.losses.dpo.DPOLoss", "lightning_pref.losses.ipo.IPOLoss"


def test_ckpt_path_last_on_an_empty_directory_starts_a_new_run(tmp_path, monkeypatch, caplog, capsys):
    """As Lightning's own ckpt_path="last": a requeue script that always passes it works on the first launch."""
    from lightning_pref.cli import main

    fit = ["fit", "--config", str(REPO / "configs/dpo.yaml"), "--trainer.default_root_dir", str(tmp_path),
           "--ckpt_path", "last"]
    assert _chosen(monkeypatch, fit) is None
    assert f"--ckpt_path last: no checkpoint under {tmp_path / 'lightning_logs'} yet; starting a new run" in caplog.text
    monkeypatch.undo()
    monkeypatch.setattr("sys.argv", ["lightning-pref"])
    # nothing to validate, though: one line
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", *fit[1:]])
    assert exit_info.value.code == 2 and "--ckpt_path last: no checkpoint under" in capsys.readouterr().err


def test_ckpt_path_last_resolves_within_the_run_the_config_describes(tmp_path, monkeypatch, capsys):
    logs = tmp_path / "lightning_logs"
    mine = _fake_run(logs / "version_0", DPO, beta=0.1)  # configs/dpo.yaml's loss
    ipo = _fake_run(logs / "version_1", IPO, beta=0.1, length_normalize=True)  # newer, another config's run
    (logs / "version_2").mkdir()  # a run without a checkpoint
    other_beta = _fake_run(logs / "version_3", DPO, beta=0.2)
    fit = ["fit", "--config", str(REPO / "configs/dpo.yaml"), "--trainer.default_root_dir", str(tmp_path),
           "--ckpt_path", "last"]
    assert _chosen(monkeypatch, fit) == str(mine)  # exactly the config's loss; not the newest of any
    assert _chosen(monkeypatch, [*fit, "--model.loss", "ipo"]) == str(ipo)
    assert _chosen(monkeypatch, [*fit, "--model.loss.beta", "0.2"]) == str(other_beta)
    # the same loss class, neither with the config's arguments, and not the same as each other: not a guess
    with pytest.raises(SystemExit) as exit_info:
        _chosen(monkeypatch, [*fit, "--model.loss.beta", "0.3"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "trained with different losses" in err
    assert str(mine) in err and str(other_beta) in err and str(ipo) not in err
    # runs of other configs only: listed, with what differs
    with pytest.raises(SystemExit) as exit_info:
        _chosen(monkeypatch, [*fit, "--model.loss", "cdpo"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "was trained with this config" in err and "the config has CDPOLoss" in err
    # another logger directory (the README's TensorBoard run): its own runs, not default_root_dir's
    assert _chosen(monkeypatch, [*fit, "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir",
                                 str(tmp_path / "tb")]) is None
    theirs = _fake_run(tmp_path / "tb/lightning_logs/version_0", DPO, beta=0.1)
    assert _chosen(monkeypatch, [*fit, "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir",
                                 str(tmp_path / "tb")]) == str(theirs)


def test_a_loss_class_other_than_the_checkpoints_is_an_error_however_given(tmp_path, capsys):
    """The config file's loss too, not only --model.loss: validating an IPO run with the DPO config is a mistake."""
    from lightning_pref.cli import main

    ipo = _fake_run(tmp_path / "lightning_logs/version_0", IPO, beta=0.1, length_normalize=True)
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", str(REPO / "configs/dpo.yaml"), "--ckpt_path", str(ipo)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert "was trained with model.loss IPOLoss(beta=0.1, length_normalize=True), but the config gives DPOLoss" in err


@pytest.mark.parametrize("accumulate", [1, 2])
def test_progress_bar_total_after_a_resume_mid_epoch(tmp_path, accumulate):
    """6 batches an epoch; 4 steps, then resumed to 6 steps: the bar counts the resumed epoch's batches from 5 (as
    the epoch's batches), so its total is 6, not the 2 steps left (which showed 6/2)."""
    import json

    from lightning_pref.cli import main

    data = write_jsonl(tmp_path / "pairs.jsonl", generate(24 * accumulate, seed=2)[0])
    bar = tmp_path / "bar.jsonl"
    fit = ["fit", "--config", str(REPO / "configs/dpo.yaml"), "--data.train", str(data), "--data.val", "null",
           "--data.batch_size", "4", "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks+=tests.support.BarTotals",
           "--trainer.callbacks.path", str(bar), "--trainer.accumulate_grad_batches", str(accumulate)]
    main([*fit, "--trainer.max_steps", "2"])
    first = [json.loads(line) for line in bar.read_text().splitlines()]
    assert [total for _, _, total in first] == [2 * accumulate] * 2 * accumulate
    bar.unlink()
    main([*fit, "--trainer.max_steps", "6", "--ckpt_path", "last"])
    shown = [json.loads(line) for line in bar.read_text().splitlines()]
    batches = 6 * accumulate
    assert [count for _, count, _ in shown[: batches - 2 * accumulate]] == list(range(2 * accumulate + 1, batches + 1))
    assert all(count <= total == batches for _, count, total in shown[: batches - 2 * accumulate])
    assert shown[-1][0] == 6


def test_training_ends_with_a_checkpoint_of_its_last_step(tmp_path):
    """Validating every 2 steps and stopping at 3: Lightning saved after validations only, so ``last.ckpt`` (and
    the export command printed) held step 2's policy, and the summary titled step 1's metrics "final". Now the
    end of training saves its step, and the summary says which step its metrics measured."""
    data = write_jsonl(tmp_path / "pairs.jsonl", generate(24, seed=2)[0])
    val = write_jsonl(tmp_path / "val.jsonl", generate(6, seed=3)[0])
    run = _fit(tmp_path / "a run", data, "--data.val", str(val), "--trainer.val_check_interval", "2",
               "--trainer.max_steps", "3", "--checkpoint.every_n_train_steps", "null")
    assert run.returncode == 0, run.stderr[-2000:]
    checkpoints = tmp_path / "a run/lightning_logs/version_0/checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 3
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    console = " ".join((run.stdout + run.stderr).split())
    assert "last validation (step 1, after 2 of the run's 3 optimizer steps;" in console
    # the printed export command pastes as it is, the space in the run's path quoted (was: split in two)
    export = next(line for line in run.stdout.splitlines() if line.startswith("export:"))
    assert shlex.split(export.removeprefix("export:"))[3] == str(checkpoints / "last.ckpt")


def test_the_checkpoint_callback_keeps_lightnings_state_key():
    """Checkpoints saved under Lightning's ModelCheckpoint resume the callback's state (best path, scores)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_pref.runs import Checkpoints

    assert Checkpoints(every_n_train_steps=3).state_key == ModelCheckpoint(every_n_train_steps=3).state_key


@pytest.mark.parametrize("change", [["--data.batch_size", "8"], ["--data.train", "fewer"]], ids=["batch", "data"])
def test_a_mid_epoch_resume_with_other_batches_is_refused(tmp_path, change):
    """Stopped after 2 of an epoch's 6 batches of 4, a resume in batches of 8 skipped the rest of the epoch
    (Lightning restored "2 batches done" of an epoch that now has 3, and the sampler skipped 8 examples: 16 of
    24 never trained on, exit 0); another data file made the skip meaningless. Both are one line now, and the
    same resume at the run's own batches works."""
    data = write_jsonl(tmp_path / "pairs.jsonl", generate(24, seed=2)[0])
    write_jsonl(tmp_path / "fewer.jsonl", generate(20, seed=2)[0])
    first = _fit(tmp_path / "run", data, "--trainer.max_steps", "2", "--checkpoint.every_n_train_steps", "null")
    assert first.returncode == 0, first.stderr[-2000:]
    change = [str(tmp_path / "fewer.jsonl") if value == "fewer" else value for value in change]
    refused = _fit(tmp_path / "run", data, "--trainer.max_steps", "4", "--ckpt_path", "last", *change)
    assert refused.returncode == 2, refused.stderr[-2000:]
    last = refused.stderr.strip().splitlines()[-1]
    assert "in the middle of an epoch, after 8 examples per process in batches of 4 on 1 process(es) over 24" in last
    assert "resume with the same data.train, data.batch_size and number of devices" in last
    same = _fit(tmp_path / "run", data, "--trainer.max_steps", "4", "--ckpt_path", "last")
    assert same.returncode == 0, same.stderr[-2000:]
