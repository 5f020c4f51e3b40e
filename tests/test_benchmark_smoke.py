"""The training-step benchmark runs end to end in smoke mode and writes its results (no timing assertions)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

SCRIPT = REPO / "benchmarks" / "train_step.py"
ROW_KEYS = {
    "seconds_per_step", "tokens_per_second", "pairs_per_second", "tokens_per_step", "train_peak_rss_mb",
    "peak_rss_mb", "model_flops_per_second", "mfu", "time_vs_floor",
}


def _positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_train_step_smoke(tmp_path: Path, precision: str) -> None:
    """Every variant's path runs in both precisions (bf16 on CPU autocast here, the GPU benchmark's setting)."""
    out = tmp_path / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--no-trl", "--precision", precision, "--out-dir", str(out),
         "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "smoke.json").read_text())
    assert (out / "smoke.md").read_text().startswith("# smoke")
    assert summary["errors"] == {}
    assert _positive(summary["matmul_peak_flops"])
    assert summary["params"]["flop_params"] > 0
    assert summary["precision"] == precision
    assert summary["matmul_dtype"] == ("float32" if precision == "32-true" else "bfloat16")
    assert set(summary["variants"]) == {"floor", "lp"}
    # The reference forward was timed inside lightning-pref's step: a share strictly between 0 and 1.
    assert 0 < summary["variants"]["lp"]["reference_share_of_step"] < 1
    assert summary["precomputed_speedup_bound"] > 1
    for name, row in summary["variants"].items():
        assert ROW_KEYS <= set(row), (name, sorted(ROW_KEYS - set(row)))
        for key in ROW_KEYS:
            assert _positive(row[key]), (name, key, row[key])
        assert 0 <= row["pad_fraction"] < 1


def test_memory_smoke(tmp_path: Path) -> None:
    """The memory table's script runs end to end on a small vocabulary (no TRL): peaks for every batch."""
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "memory.py"), "--no-trl", "--vocab", "512", "--batches", "1,2",
         "--budget-batch", "1", "--prompt-len", "8", "--response-len", "8", "--variants", "floor,lp", "--in-process",
         "--name", "mem", "--out-dir", str(out), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=REPO, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "mem.json").read_text())
    assert summary["errors"] == {}, summary["errors"]
    for name in ("floor", "lp"):
        peaks = summary["variants"][name]["peak_mb"]
        assert set(peaks) == {"1", "2"} and all(_positive(v) for v in peaks.values()), (name, peaks)
    assert (out / "mem.md").read_text().startswith("#")


def test_budget_crossing() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from memory import largest_within
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert largest_within([(2, 100.0), (4, 200.0), (8, 400.0)], 300.0) == (4, 6.0)
    assert largest_within([(2, 100.0), (4, 200.0)], 50.0) == (None, None)
    assert largest_within([(2, 100.0), (4, 200.0)], 300.0) == (4, 6.0)  # extrapolated past the last point
