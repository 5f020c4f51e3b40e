"""Runs a user can find again: the README's command sequence (fit, validate, predict, evaluate, report, fit
resumed with ``--ckpt_path last``) on the tiny default, checking where each command writes and what ``report`` and
``--ckpt_path last`` pick."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import pytest
import torch
import yaml

from lightning_pref.cli import main
from lightning_pref.data.synthetic import generate
from tests.support import REPO, write_jsonl


def _run(capsys, *argv: str) -> str:
    """Run a command in-process; what it printed on stdout."""
    main(list(argv))
    return capsys.readouterr().out


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_readme_sequence_writes_beside_the_run_and_finds_it_again(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["lightning-pref"])  # LightningCLI warns about pytest's own flags
    data = write_jsonl(tmp_path / "pairs.jsonl", generate(8, seed=5)[0])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"User: tell me about topic {i}\nAssistant:"}
                                                       for i in range(3)])
    root = tmp_path / "outputs/dpo"
    logs = root / "lightning_logs"
    config = ["--config", str(REPO / "configs/dpo.yaml"), "--trainer.default_root_dir", str(root),
              "--data.train", str(data), "--data.val", str(data), "--data.batch_size", "4",
              "--model.generation.max_new_tokens", "4", "--trainer.callbacks.num_prompts=1",
              "--progress_bar.refresh_rate", "0"]
    fit = ["fit", *config, "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1",
           "--ckpt_path", "last"]  # as a requeue script passes it, from the first launch on

    # fit, on an empty directory: a new run
    _run(capsys, *fit, "--trainer.max_steps", "2")
    run = logs / "version_0"
    last = run / "checkpoints/last.ckpt"
    assert last.is_file() and yaml.safe_load((run / "run.yaml").read_text())["resumed_from"] is None
    trained = _digest(last)

    # validate, predict, evaluate of it: inside the run, each in a directory of its own, each saying where
    out = _run(capsys, "validate", *config, "--ckpt_path", "last")
    assert f"validate: metrics in {run / 'validate'}" in out and (run / "validate/metrics.csv").is_file()
    out = _run(capsys, "predict", *config, "--ckpt_path", "last", "--data.predict", str(prompts))
    assert f"predict: wrote 3 records to {run / 'predict/predictions.jsonl'}" in out
    assert len((run / "predict/predictions.jsonl").read_text().splitlines()) == 3
    out = _run(capsys, "evaluate", *config, "--ckpt_path", "last", "--judge", "no_shouting")
    assert f"predict: wrote 8 records to {run / 'evaluate/predictions.jsonl'}" in out
    assert f"written to {run / 'checkpoints/last.evaluation.json'}" in out
    assert json.loads((run / "checkpoints/last.evaluation.json").read_text())["comparisons"] == 8
    # again: never over the first ones
    _run(capsys, "validate", *config, "--ckpt_path", "last")
    assert (run / "validate-1/metrics.csv").is_file() and (run / "validate/metrics.csv").is_file()
    assert sorted(p.name for p in logs.iterdir()) == ["version_0"]  # no version that passes for a newer run
    assert _digest(last) == trained

    matplotlib = importlib.util.find_spec("matplotlib") is not None
    if matplotlib:
        out = _run(capsys, "report", str(root))
        assert f"newest training run under {root}: {run}" in out and (run / "report.html").is_file()

    # fit resumed with --ckpt_path last: the run above, into a new version
    _run(capsys, *fit, "--trainer.max_steps", "4")
    resumed = logs / "version_1"
    assert torch.load(resumed / "checkpoints/last.ckpt", weights_only=False)["global_step"] == 4
    assert yaml.safe_load((resumed / "run.yaml").read_text()) == {
        "command": "fit", "resumed_from": str(last), "resumed_at_step": 2}
    assert _digest(last) == trained  # nothing of the earlier run overwritten

    # last now means the resumed run; report the newest training run, with the history before the resume
    out = _run(capsys, "validate", *config, "--ckpt_path", "last")
    assert f"validate: metrics in {resumed / 'validate'}" in out
    if matplotlib:
        out = _run(capsys, "report", str(root))
        assert f"newest training run under {root}: {resumed}" in out
        assert f"resumed from {run}: its metrics up to step 1 come first" in out
    from lightning_pref.report import read_history

    series, earlier = read_history(resumed)
    assert earlier == [(run, 2)]
    assert [step for step, _ in series["train/loss"]] == [0, 1, 2, 3]
    assert [step for step, _ in series["val/loss"]] == [1, 3]


@pytest.mark.parametrize("logger", ["default", "CSVLogger"])
def test_a_command_on_a_checkpoint_elsewhere_keeps_lightnings_versions(tmp_path, monkeypatch, capsys, logger):
    """A checkpoint outside a run directory (copied, downloaded) has no run to write beside: the command gets
    Lightning's new version directory, and report still picks the training run."""
    import shutil

    monkeypatch.setattr("sys.argv", ["lightning-pref"])
    data = write_jsonl(tmp_path / "pairs.jsonl", generate(4, seed=5)[0])
    root = tmp_path / "root"
    config = ["--config", str(REPO / "configs/dpo.yaml"), "--trainer.default_root_dir", str(root),
              "--data.train", str(data), "--data.val", str(data), "--data.batch_size", "4",
              "--model.generation.max_new_tokens", "2", "--trainer.callbacks.num_prompts=1",
              "--progress_bar.refresh_rate", "0"]
    if logger != "default":
        config += ["--trainer.logger", logger, "--trainer.logger.save_dir", str(root)]
    _run(capsys, "fit", *config, "--trainer.max_steps", "1", "--trainer.log_every_n_steps", "1")
    copied = shutil.copy(root / "lightning_logs/version_0/checkpoints/last.ckpt", tmp_path / "model.ckpt")
    out = _run(capsys, "validate", *config, "--ckpt_path", str(copied))
    assert f"validate: metrics in {root / 'lightning_logs/version_1'}" in out
    assert yaml.safe_load((root / "lightning_logs/version_1/run.yaml").read_text())["command"] == "validate"
    from lightning_pref.report import resolve_run_dir

    assert resolve_run_dir(root) == root / "lightning_logs/version_0"


def test_an_option_given_on_the_command_line_is_found_in_each_form_users_type():
    """check_matches and check_restored ask the same question of the command line; they had two tests that had
    drifted: ``--model.init_args.loss`` was not seen as giving the loss, and check_restored took a value (a config
    file named ``model.loss.yaml``) for the option."""
    from lightning_pref.runs import _flag

    assert _flag(["--model.loss", "ipo"], "loss") == "--model.loss"
    assert _flag(["--model.loss=ipo"], "loss") == "--model.loss"
    assert _flag(["--model.init_args.loss.init_args.beta", "0.2"], "loss") == "--model.init_args.loss.init_args.beta"
    assert _flag(["--model.optimizer.lr=0.1"], "optimizer") == "--model.optimizer.lr"
    assert _flag(["--model.lossy", "1", "--config", "model.loss.yaml"], "loss") is None
