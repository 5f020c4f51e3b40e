"""The RL-step benchmark runs end to end in smoke mode and writes its results (no timing assertions)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

from tests.support import REPO


def _positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_rl_step_smoke(tmp_path: Path) -> None:
    """Tiny model, 2 prompts x 2 samples, one timed step of each run, in one process (~10 s); TRL's runs too where
    this environment has trl."""
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "rl_step.py"), "--smoke", "--out-dir", str(out),
         "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=REPO, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "rl_step_smoke.json").read_text())
    assert (out / "rl_step_smoke.md").read_text().startswith("# rl_step_smoke")
    assert summary["errors"] == {}
    trl = find_spec("trl") is not None
    expected = {"tiny/grpo": {"lp", "lp_noshare"} | ({"trl"} if trl else set()),
                "tiny/rloo": {"lp"} | ({"trl"} if trl else set())}
    results = summary["results"]
    assert {key: {v for v in results[key] if v in ("lp", "lp_noshare", "trl")} for key in results} == expected
    for key, entry in results.items():
        for variant in expected[key]:
            row = entry[variant]
            for name in ("cpu", "wall", "episodes_per_cpu_second", "episodes_per_second", "completion_tokens"):
                assert _positive(row[name]), (key, variant, name, row[name])
            assert row["episodes"] == 4  # 2 prompts x 2 samples
            assert _positive(row["split_cpu"]["generation"]) and 0 < row["share_cpu"]["generation"] < 1
        if trl:  # both systems sampled for the same prompts in every step
            assert entry["same_prompts"] and _positive(entry["ratio_cpu"]["median"]), entry
    # Sharing the prefill changes how the samples are computed, not what they are.
    grpo = results["tiny/grpo"]
    assert grpo["lp"]["completion_tokens"] == grpo["lp_noshare"]["completion_tokens"]
