"""Exact resume after SIGKILL, and atomic checkpoint writes."""

from __future__ import annotations

import csv
import os
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
    assert got["global_step"] == expected["global_step"] == 9
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


def test_ckpt_path_last_without_runs_is_one_line(tmp_path, capsys):
    from lightning_pref.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs/dpo.yaml"), "--trainer.default_root_dir", str(tmp_path),
              "--ckpt_path", "last"])
    assert exit_info.value.code == 2 and "--ckpt_path last: no lightning_logs" in capsys.readouterr().err
