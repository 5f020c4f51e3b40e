"""HostMemory: a step's freed host memory stays in the process while the Trainer runs (glibc), and goes back after.

Page faults depend on what the heap already holds, so each case runs in a fresh interpreter (:func:`child`)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import pytest
import torch
from lightning.pytorch import Callback

from lightning_pref import host_memory
from lightning_pref.errors import UserInputError
from lightning_pref.host_memory import HostMemory, glibc
from tests.support import REPO

GLIBC = pytest.mark.skipif(glibc() is None, reason="glibc's malloc parameters")
BLOCK = 64 * 2**20  # bytes: above glibc's largest mmap threshold (32 MiB), so mapped anew each time by default
PAGES = BLOCK // 4096


def _faults(blocks: int) -> list[int]:
    """Page faults of allocating, writing and freeing one block, ``blocks`` times."""
    out = []
    for _ in range(blocks):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.empty(BLOCK // 4)
        block.fill_(1.0)
        del block
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return out


class BlockFaults(Callback):
    """Page faults of a block allocated and freed at the end of each training step."""

    seen: list[int] = []

    def on_train_batch_end(self, *args) -> None:
        BlockFaults.seen += _faults(1)


def child(case: str, root: str = "") -> None:
    """One case in this fresh interpreter; prints its page faults as JSON."""
    if case == "callback":
        before = _faults(2)
        callback = HostMemory()
        callback.setup(None, None, "fit")
        kept = _faults(6)
        callback.teardown(None, None, "fit")
        print(json.dumps({"before": before, "kept": kept, "after": _faults(1)}))
        return
    from lightning_pref.cli import main

    sys.argv = ["lightning-pref"]
    main(["fit", "--config", str(REPO / "configs/dpo.yaml"), "--trainer.default_root_dir", root,
          "--trainer.max_steps", "4", "--trainer.limit_val_batches", "0", "--data.batch_size", "4",
          "--trainer.enable_progress_bar", "false", "--trainer.callbacks+=tests.test_host_memory.BlockFaults",
          *(["--host_memory.keep_freed", case] if case != "default" else [])])
    print(json.dumps({"steps": BlockFaults.seen, "after": _faults(1)}))


def _run_child(*args: str) -> dict[str, list[int]]:
    out = subprocess.run([sys.executable, "-c", f"from tests.test_host_memory import child; child{args!r}"],
                         cwd=REPO, capture_output=True, text=True, check=True, timeout=300).stdout
    return json.loads(out.strip().splitlines()[-1])


@GLIBC
def test_a_freed_block_is_reused_while_the_trainer_runs_and_handed_back_after():
    faults = _run_child("callback")
    assert min(faults["before"]) > PAGES // 2, faults  # glibc's default: every block's pages fault in
    # The first blocks fault in as the heap grows (one or two: where the kernel lets it grow differs run to run),
    # then the blocks reuse their pages.
    assert sum(f > PAGES // 2 for f in faults["kept"]) <= 3 and max(faults["kept"][-2:]) < PAGES // 10, faults
    assert faults["after"][0] > PAGES // 2, faults  # handed back at teardown


@GLIBC
@pytest.mark.parametrize("keep", ["default", "false"])
def test_the_command_keeps_freed_memory_unless_told_not_to(tmp_path, keep):
    faults = _run_child(keep, str(tmp_path))
    assert len(faults["steps"]) == 4
    if keep == "default":
        assert sum(f > PAGES // 2 for f in faults["steps"]) <= 2 and faults["steps"][-1] < PAGES // 10, faults
        assert faults["after"][0] > PAGES // 2, faults  # handed back when the command ends
    else:
        assert min(faults["steps"]) > PAGES // 2, faults


def test_required_where_the_c_library_is_not_glibc_is_refused(monkeypatch):
    monkeypatch.setattr(host_memory, "glibc", lambda: None)
    HostMemory().setup(None, None, "fit")  # default: only where glibc is
    HostMemory(keep_freed=False).setup(None, None, "fit")
    with pytest.raises(UserInputError, match=r"--host_memory.keep_freed true needs glibc"):
        HostMemory(keep_freed=True).setup(None, None, "fit")
