"""Shared fixtures: a tiny random Llama, the byte-level tokenizer, and small preference files."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # Each xdist worker, and the processes it starts (the CLI, DDP ranks), gets its share of the cores: with
    # torch's default (a thread per core) in each of two workers on two cores, one worker's OpenMP threads spin
    # waiting on the other's (the suite took 12 min 13 s; 7 min 7 s with one thread per worker). Before torch is
    # imported, which reads the variable once; a value already set wins.
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import pytest  # noqa: E402
from transformers import ByT5Tokenizer  # noqa: E402

from lightning_pref.data.synthetic import generate  # noqa: E402
from lightning_pref.models import load_causal_lm  # noqa: E402
from tests.support import REPO, TINY, write_jsonl  # noqa: E402

#: Caches that running the tests writes into a checkout by design (bytecode, pytest's and ruff's caches, the
#: virtual environments and an editable install's metadata): not the tests' outputs.
TOOL_CACHES = ("__pycache__", ".pytest_cache", ".ruff_cache", ".venv", ".venv-floor", ".egg-info")


def _tree_state() -> dict[str, tuple[int, int]] | None:
    """Every file of the checkout that is not a tracked, unmodified file, with its size and modification time:
    untracked and modified files, and the files under ignored directories (``outputs/``, ``lightning_logs/``),
    tool caches aside. ``None`` outside a git checkout (an unpacked sdist): nothing to compare."""
    try:
        status = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=normal", "-z"],
                                cwd=REPO, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if status.returncode != 0:
        return None
    state: dict[str, tuple[int, int]] = {}
    for entry in status.stdout.split("\0"):
        path = entry[3:]
        if not path or any(part.endswith(TOOL_CACHES) for part in Path(path).parts):
            continue
        full = REPO / path
        files = [full] if full.is_file() else [p for p in full.rglob("*") if p.is_file()] if full.is_dir() else []
        for file in files:
            relative = file.relative_to(REPO)
            if not any(part.endswith(TOOL_CACHES) for part in relative.parts):
                stat = file.stat()
                state[str(relative)] = (stat.st_size, stat.st_mtime_ns)
    return state


def pytest_sessionstart(session: pytest.Session) -> None:
    if not hasattr(session.config, "workerinput"):  # the controller (or the only process), not xdist's workers
        session.config.stash[_TREE] = _tree_state()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Tests write only under temporary directories: a file of the checkout created, changed or removed during the
    session (say, ``outputs/dpo/lightning_logs/version_0/config.yaml`` from a CLI run without a temporary root,
    which turned the user's next ``make demo`` into ``version_1``) fails the session, naming the files."""
    before = session.config.stash.get(_TREE, None)
    after = _tree_state() if before is not None else None
    if before is None or after is None or after == before:
        return
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_sep("=", "the tests changed the working tree (tests must write under temporary directories)",
                           red=True)
        for path in changed[:20]:
            what = "created" if path not in before else "removed" if path not in after else "modified"
            reporter.write_line(f"{what}: {path}")
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


_TREE = pytest.StashKey[dict | None]()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Tokenization and reference caches go to a per-session temporary folder, never to ~/.cache."""
    monkeypatch.setenv("LIGHTNING_PREF_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(autouse=True)
def _only_builtin_plugins(monkeypatch):
    """Tests see the built-in plugins only, whatever plugins happen to be installed in the environment."""
    import importlib.metadata

    from lightning_pref import registry

    registries = registry.REGISTRIES
    groups = {r.group for r in registries}
    real = importlib.metadata.entry_points
    monkeypatch.setattr(
        importlib.metadata, "entry_points", lambda **kw: [] if kw.get("group") in groups else real(**kw)
    )
    for r in registries:
        monkeypatch.setattr(r, "plugins_loaded", False)


@pytest.fixture
def tokenizer() -> ByT5Tokenizer:
    return ByT5Tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    return load_causal_lm(TINY, field="test", seed=0, vocab_size=len(tokenizer))


@pytest.fixture
def pairs_file(tmp_path: Path) -> Path:
    records, _ = generate(24, seed=3)
    return write_jsonl(tmp_path / "pairs.jsonl", records)


@pytest.fixture(scope="session")
def smollm2():
    """Path of SmolLM2-135M-Instruct as a plain bf16 Hugging Face directory (see ``tests/real.py``)."""
    from tests.real import smollm2_dir

    return smollm2_dir()
