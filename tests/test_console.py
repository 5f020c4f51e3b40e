"""The console of ``make demo`` as a newcomer reads it: no traceback, no warning we could have avoided, no
third-party noise we cause, and the summary at the end."""

from __future__ import annotations

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
    for noise in ("Saving the dataset", "💡 Tip", "Epoch 0/-2", "v_num", "args and sys.argv", "LitLogger"):
        assert noise not in console, noise
    last = tmp_path / "out/lightning_logs/version_0/checkpoints/last.ckpt"
    assert "final validation (step 120)" in console and "val/rewards/accuracies" in console
    assert "lightning-pref export --ckpt_path" in console and str(last) in console.replace("\n", "")
    assert "policy parameters float32 (trainer.precision 32-true" in console  # the dtype line, once
    assert console.count("policy parameters") == 1
