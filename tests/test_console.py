"""The console of ``make demo`` as a newcomer reads it: no traceback, no warning we could have avoided, no
third-party noise we cause, and the summary at the end."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys

import pytest

from tests.support import REPO

pytestmark = pytest.mark.slow


def test_make_demo_console_is_clean(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "LIGHTNING_PREF_CACHE": str(tmp_path / "cache"),
           "COLUMNS": "120"}
    result = subprocess.run(
        [sys.executable, "-m", "lightning_pref", "fit", "--config", str(REPO / "configs/dpo.yaml"),
         "--trainer.default_root_dir", str(tmp_path / "out")],
        env=env, capture_output=True, text=True, cwd=tmp_path,
    )
    console = result.stdout + result.stderr
    assert result.returncode == 0, console[-3000:]
    assert "Traceback" not in console
    assert not re.search(r"\w*Warning\b|warnings\.warn|deprecated", console), console[-3000:]
    for noise in ("Saving the dataset", "💡 Tip", "Epoch 0/-2", "v_num", "args and sys.argv", "LitLogger",
                  "Skipping setting a default `ModelSummary`", "generation flags are not valid"):
        assert noise not in console, noise
    last = tmp_path / "out/lightning_logs/version_0/checkpoints/last.ckpt"
    assert "final validation (step 119, after 120 optimizer steps)" in console and "val/rewards/accuracies" in console
    assert "lightning-pref export --ckpt_path" in console and str(last) in console.replace("\n", "")
    assert "policy parameters float32 (trainer.precision 32-true" in console  # the dtype line, once
    assert console.count("policy parameters") == 1


def _demo_env(tmp_path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
            "LIGHTNING_PREF_CACHE": str(tmp_path / "cache"), "COLUMNS": "100"}


SHORT = ["--trainer.max_steps", "10", "--trainer.val_check_interval", "10", "--trainer.log_every_n_steps", "5"]


def test_a_log_file_gets_a_metrics_line_every_log_every_n_steps(tmp_path):
    """Standard output to a file (nohup, SLURM, CI): no live bar, whose frames would only appear at the end, but a
    line of metrics every log_every_n_steps, legible for small values, labelled with metrics.csv's step."""
    log = tmp_path / "run.log"
    with log.open("w") as out:
        result = subprocess.run(
            [sys.executable, "-m", "lightning_pref", "fit", "--config", str(REPO / "configs/dpo.yaml"), *SHORT,
             "--trainer.default_root_dir", str(tmp_path / "out")], env=_demo_env(tmp_path), stdout=out,
            stderr=subprocess.STDOUT, cwd=tmp_path,
        )
    text = log.read_text()
    assert result.returncode == 0, text[-3000:]
    lines = re.findall(r"^step (\d+) \[(\d+)/10\]  train/loss ([0-9.e+-]+)", text, re.M)
    assert [(int(a), int(b)) for a, b, _ in lines] == [(4, 5), (9, 10)]
    with open(tmp_path / "out/lightning_logs/version_0/metrics.csv") as f:
        logged = {r["step"]: r["train/loss"] for r in csv.DictReader(f) if r.get("train/loss")}
    for step, _, loss in lines:  # the console's numbers are metrics.csv's, at its steps, 4 significant digits
        assert float(loss) == pytest.approx(float(logged[step]), rel=1e-3) and float(loss) > 0
    assert "validation at step 9  val/logps/chosen" in text
    assert "Epoch 0" not in text  # no frame of a live bar
    assert text.index("validation at step 9") < text.index("final validation") < text.index("report:")


def test_on_a_terminal_the_summary_follows_the_bar(tmp_path):
    """On a pseudo-terminal the live bar redraws itself; it is stopped when fit ends, so the summary's lines come
    after its last frame and nothing redraws over them. The model summary has no FLOPs column of zeros."""
    import pty

    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "lightning_pref", "fit", "--config", str(REPO / "configs/dpo.yaml"), *SHORT,
         "--trainer.default_root_dir", str(tmp_path / "out")], env={**_demo_env(tmp_path), "TERM": "xterm"},
        stdin=secondary, stdout=secondary, stderr=secondary, cwd=tmp_path,
    )
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert process.wait() == 0
    raw = b"".join(chunks).decode("utf-8", "replace")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)  # terminal control sequences out
    last_frame = text.rindex("Epoch 0")
    assert text.index("final validation", last_frame) < text.index("report:", last_frame)
    assert "FLOPs" not in text
