"""The ``lightning-pref`` CLI: shipped configs, loss names, real loading from a local directory, errors."""

from __future__ import annotations

import csv
import glob
import threading
import time

import pytest
import torch
import yaml

from lightning_pref import cli
from lightning_pref.cli import main
from tests.support import REPO, TINY

# Every shipped config and the loss (or advantage estimator) it selects; a config added without an entry here
# fails the count below.
CONFIGS = {
    "configs/dpo.yaml": "lightning_pref.losses.dpo.DPOLoss",
    "configs/cdpo.yaml": "lightning_pref.losses.cdpo.CDPOLoss",
    "configs/ipo.yaml": "lightning_pref.losses.ipo.IPOLoss",
    "configs/kto.yaml": "lightning_pref.losses.kto.KTOLoss",
    "configs/recipes/dpo.yaml": "lightning_pref.losses.dpo.DPOLoss",
    "configs/recipes/cdpo.yaml": "lightning_pref.losses.cdpo.CDPOLoss",
    "configs/recipes/ipo.yaml": "lightning_pref.losses.ipo.IPOLoss",
    "configs/recipes/kto.yaml": "lightning_pref.losses.kto.KTOLoss",
    "configs/reward.yaml": "lightning_pref.reward.losses.bradley_terry.BradleyTerryLoss",
    "configs/online_dpo.yaml": "lightning_pref.losses.dpo.DPOLoss",
    "configs/ppo.yaml": "lightning_pref.rl.advantages.gae.GAE",
    "configs/grpo.yaml": "lightning_pref.rl.advantages.grpo.GRPO",
    "configs/rloo.yaml": "lightning_pref.rl.advantages.rloo.RLOO",
    "configs/recipes/ppo.yaml": "lightning_pref.rl.advantages.gae.GAE",
    "configs/recipes/grpo.yaml": "lightning_pref.rl.advantages.grpo.GRPO",
}
#: What a recipe leaves to you, by recipe.
RECIPE_ARGS = {
    "configs/recipes/ppo.yaml": ["--model.init_args.policy", "./my-sft-model", "--model.init_args.judge.init_args.path",
                                 "./my-rm"],
    "configs/recipes/grpo.yaml": ["--model.init_args.policy", "./my-sft-model",
                                  "--model.init_args.judge.init_args.fn", "lightning_pref.judges.rules:no_shouting"],
}


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    """LightningCLI warns when given args while sys.argv holds pytest's own flags."""
    monkeypatch.setattr("sys.argv", ["lightning-pref"])


SMALL_RUN = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1"]


def _print_config(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_every_shipped_config_parses(capsys):
    found = sorted(str(p.relative_to(REPO)) for p in REPO.glob("configs/**/*.yaml"))
    strategies = [p for p in found if p.startswith("configs/strategy/")]
    assert strategies == ["configs/strategy/ddp.yaml", "configs/strategy/fsdp.yaml", "configs/strategy/fsdp2.yaml"]
    # strategy configs are parsed combined with a loss config in tests/test_sharding.py
    assert sorted(set(found) - set(strategies)) == sorted(CONFIGS), "add new configs to CONFIGS with their loss"
    for path, loss in CONFIGS.items():
        # recipes leave the model (and a reinforcement-learning recipe its reward) to you
        recipe = RECIPE_ARGS.get(path, ["--model.policy", "./my-sft-model"] if "/recipes/" in path else [])
        config = _print_config(capsys, "fit", "--config", str(REPO / path), *recipe)
        model = config["model"].get("init_args", config["model"])  # a RewardModule is given by class_path
        assert model.get("loss", model.get("estimator"))["class_path"] == loss, path
        if recipe:  # settings for a pretrained model, not the demo's (reinforcement learning's published lr are
            # higher: 3e-6 for PPO in the N+ recipe)
            assert model["optimizer"]["init_args"]["lr"] <= (1e-6 if "loss" in model else 3e-6)
            assert model["scheduler"]["class_path"] == "lightning_pref.schedules.WarmupDecay"


def test_print_config_without_arguments(capsys):
    config = _print_config(capsys, "fit")
    assert "model" in config and "data" in config and "trainer" in config


@pytest.mark.parametrize(
    ("argv", "class_path"),
    [
        (["--model.loss", "dpo"], "lightning_pref.losses.dpo.DPOLoss"),
        (["--model.loss=DPOLoss"], "lightning_pref.losses.dpo.DPOLoss"),
        (["--model.loss", "ipo", "--model.loss.beta", "0.3"], "lightning_pref.losses.ipo.IPOLoss"),
        (["--model.loss", "IPOLoss"], "lightning_pref.losses.ipo.IPOLoss"),
        (["--model.loss", "lightning_pref.losses.dpo.DPOLoss", "--model.loss.beta", "0.3"],
         "lightning_pref.losses.dpo.DPOLoss"),
    ],
)
def test_loss_by_name_class_or_path(capsys, argv, class_path):
    config = _print_config(capsys, "fit", "--config", str(REPO / "configs/dpo.yaml"), *argv)
    assert config["model"]["loss"]["class_path"] == class_path
    if "0.3" in argv:
        assert config["model"]["loss"]["init_args"]["beta"] == 0.3


def test_loss_name_in_yaml(tmp_path, capsys):
    extra = tmp_path / "loss.yaml"
    extra.write_text("model:\n  loss:\n    class_path: dpo\n    init_args:\n      beta: 0.25\n")
    config = _print_config(capsys, "fit", "--config", str(REPO / "configs/dpo.yaml"), "--config", str(extra))
    assert config["model"]["loss"] == {"class_path": "lightning_pref.losses.dpo.DPOLoss", "init_args": {"beta": 0.25}}


def test_weighted_composition_from_yaml(tmp_path, capsys):
    extra = tmp_path / "rpo.yaml"
    extra.write_text("model:\n  loss:\n    class_path: weighted\n    init_args:\n      terms: {dpo: 1.0, nll: 0.2}\n")
    config = _print_config(capsys, "fit", "--config", str(REPO / "configs/dpo.yaml"), "--config", str(extra))
    assert config["model"]["loss"]["class_path"] == "lightning_pref.losses.weighted.WeightedLoss"
    assert config["model"]["loss"]["init_args"]["terms"] == {"dpo": 1.0, "nll": 0.2}


def test_reference_free_loss_builds_no_reference(tmp_path, pairs_file):
    main([
        "fit", "--config", str(REPO / "configs/dpo.yaml"), "--model.loss", "simpo", "--data.train", str(pairs_file),
        "--data.val", str(pairs_file), "--trainer.default_root_dir", str(tmp_path), "--data.batch_size", "4",
        *SMALL_RUN,
    ])
    (last,) = glob.glob(str(tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"))
    state = torch.load(last, weights_only=False)["state_dict"]
    assert any(k.startswith("policy.") for k in state) and not any(k.startswith("reference.") for k in state)


def test_unknown_loss_is_one_clear_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs/dpo.yaml"), "--model.loss", "dpp"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "Unknown loss 'dpp'" in err and "Did you mean 'dpo'" in err and "Traceback" not in err


def test_losses_table(capsys):
    main(["losses"])
    out = capsys.readouterr().out
    assert "dpo" in out and "DPOLoss" in out and "beta=0.1" in out


def test_fit_then_validate_from_local_model_directory(tmp_path, pairs_file, tokenizer, caplog, capsys):
    """The real loading path: from_pretrained on a local directory (model and tokenizer saved there)."""
    from lightning_pref.models import load_causal_lm

    model_dir = tmp_path / "my-model"
    load_causal_lm(TINY, field="test", vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    main([
        "fit", "--config", str(REPO / "configs/dpo.yaml"), "--model.policy", str(model_dir),
        "--model.tokenizer", "null", "--data.train", str(pairs_file), "--data.val", str(pairs_file),
        "--trainer.default_root_dir", str(out), "--model.loss.beta", "0.2", "--data.batch_size", "4", *SMALL_RUN,
    ])
    (metrics,) = glob.glob(str(out / "lightning_logs/version_0/metrics.csv"))
    rows = list(csv.DictReader(open(metrics)))
    assert any(r["val/rewards/accuracies"] for r in rows)
    (last,) = glob.glob(str(out / "lightning_logs/version_0/checkpoints/last.ckpt"))
    assert torch.load(last, weights_only=False)["hyper_parameters"]["policy"] == str(model_dir)

    main([
        "validate", "--config", str(REPO / "configs/dpo.yaml"), "--model.policy", str(model_dir),
        "--model.tokenizer", "null", "--data.train", str(pairs_file), "--data.val", str(pairs_file),
        "--trainer.default_root_dir", str(out), "--ckpt_path", last,
    ])
    # beside the run it validates, in a directory of its own: no lightning_logs/version_1 to pass for the newest run
    assert (out / "lightning_logs/version_0/validate/metrics.csv").is_file()
    assert not (out / "lightning_logs/version_1").exists()
    assert f"validate: metrics in {out / 'lightning_logs/version_0/validate'}" in capsys.readouterr().out
    # the config file's beta differs from the trained one: the checkpoint's loss is used, and that is said
    assert any("model.loss DPOLoss(beta=0.2) from the checkpoint" in r.getMessage() for r in caplog.records)


def test_missing_model_directory_is_one_line(tmp_path, capsys):
    # a run directory under tmp_path: the error comes after the run's config.yaml is written
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs/dpo.yaml"), "--model.policy", str(tmp_path / "nope"),
              "--model.tokenizer", "byte", "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "model.policy: cannot load" in err and "Traceback" not in err


def test_lightning_misconfiguration_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs/dpo.yaml"), "--trainer.val_check_interval", "0.5",
              "--trainer.default_root_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "val_check_interval" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory) -> str:
    """The last.ckpt of a 1-step DPO run of configs/dpo.yaml."""
    from lightning_pref.data.synthetic import generate
    from tests.support import write_jsonl

    tmp = tmp_path_factory.mktemp("ckpt")
    data = write_jsonl(tmp / "pairs.jsonl", generate(8, seed=2)[0])
    import sys

    argv, sys.argv = sys.argv, ["lightning-pref"]
    try:
        main(["fit", "--config", str(REPO / "configs/dpo.yaml"), "--data.train", str(data), "--data.val", "null",
              "--trainer.max_steps", "1", "--data.batch_size", "4", "--trainer.default_root_dir", str(tmp)])
    finally:
        sys.argv = argv
    return str(tmp / "lightning_logs/version_0/checkpoints/last.ckpt")


def _one_line_error(capsys, argv: list[str]) -> str:
    """Exit status 2 and one ``error:`` line, the last thing printed (a run that got as far as loading data may
    have printed its data summary before), and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == err.splitlines()[-1:] and "Traceback" not in err, err[-2000:]
    return errors[0]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("negative beta", r"model\.loss: dpo: beta must be > 0, got -1"),
        ("cdpo epsilon", r"model\.loss: cdpo: epsilon must be in \[0, 0\.5\), got 0\.7"),
        ("negative lr", r"model\.optimizer: Invalid learning rate: -1"),
        ("not utf-8", r"latin1\.jsonl:2: not UTF-8 text \(byte 0xe9\); save the file as UTF-8"),
        ("truncated checkpoint", r"--ckpt_path: .*truncated\.ckpt is not a readable checkpoint"),
        ("other model size", r"--ckpt_path: .*last\.ckpt was trained with model\.policy \{.*'hidden_size': 64.*, but "
                             r"the command line gives \{.*'hidden_size': 32"),
        ("other loss", r"--ckpt_path: .* was trained with model\.loss DPOLoss\(beta=0\.1\), but the command line "
                       r"gives IPOLoss\(beta=0\.1, length_normalize=True\)"),
        ("export onto a file", r"--output_dir: .*taken is a file"),
    ],
)
def test_ordinary_mistakes_are_one_line(tmp_path, capsys, run_checkpoint, case, expected):
    import re

    fit = ["fit", "--config", str(REPO / "configs/dpo.yaml"), "--trainer.max_steps", "1",
           "--trainer.default_root_dir", str(tmp_path)]
    if case == "negative beta":
        argv = [*fit, "--model.loss.beta", "-1"]
    elif case == "cdpo epsilon":
        argv = [*fit, "--model.loss", "cdpo", "--model.loss.epsilon", "0.7"]
    elif case == "negative lr":
        argv = [*fit, "--model.optimizer.init_args.lr", "-1"]
    elif case == "not utf-8":
        data = tmp_path / "latin1.jsonl"
        data.write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "caf\xe9", "chosen": "b", '
                         b'"rejected": "c"}\n')
        argv = [*fit, "--data.train", str(data), "--data.val", "null"]
    elif case == "truncated checkpoint":
        broken = tmp_path / "truncated.ckpt"
        data = open(run_checkpoint, "rb").read()
        broken.write_bytes(data[: len(data) // 2])
        argv = ["validate", "--config", str(REPO / "configs/dpo.yaml"), "--ckpt_path", str(broken)]
    elif case == "other model size":
        argv = ["validate", "--config", str(REPO / "configs/dpo.yaml"), "--model.policy.hidden_size", "32",
                "--ckpt_path", run_checkpoint]
    elif case == "other loss":
        argv = ["validate", "--config", str(REPO / "configs/dpo.yaml"), "--model.loss", "ipo",
                "--ckpt_path", run_checkpoint]
    else:
        (tmp_path / "taken").write_text("a file of yours")
        argv = ["export", "--ckpt_path", run_checkpoint, "--output_dir", str(tmp_path / "taken")]
    err = _one_line_error(capsys, argv)
    assert re.search(expected, err), err
    if case == "export onto a file":
        assert (tmp_path / "taken").read_text() == "a file of yours"


SUBCOMMANDS = ["fit", "validate", "test", "predict", "evaluate", "losses", "judges", "export", "report"]


def test_help_lists_every_subcommand_in_one_line(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:  # the name, then its help on the same line
        assert any(line.split()[:1] == [name] and len(line.split()) > 1 for line in out.splitlines()), name


def test_judges_table(capsys):
    main(["judges"])
    out = capsys.readouterr().out
    for text in ("no_shouting", "NoShoutingJudge", "function", "FunctionJudge", "reward_model", "batch_size=8"):
        assert text in out, text


def test_losses_table_fits_80_columns(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    main(["losses"])
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80
    for text in ("DPOLoss", "Rafailov et al. 2023", "beta=0.1", "bradley_terry", "BradleyTerryLoss"):
        assert text in out, text


@pytest.mark.parametrize("argv", [["losses"], ["judges"], ["--help"], ["report", "--help"]])
def test_listings_and_help_start_without_the_training_stack(argv):
    """What these commands do needs neither Lightning nor transformers nor datasets; importing them would cost
    seconds of start-up (checked by what is imported, not by a timing)."""
    import os
    import subprocess
    import sys

    script = (
        "import sys\nfrom lightning_pref.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "loaded = [m for m in ('lightning.pytorch', 'transformers', 'datasets') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_command_ends_a_distributed_run_without_finalizing_the_interpreter(monkeypatch):
    """After a distributed run ``lightning-pref`` joins the process's threads, runs its exit handlers, and ends
    with ``os._exit(0)``: gloo's worker threads outlive the process group and release a collective's tensors
    after it has returned, and one doing so during interpreter finalization aborts a finished run (exit 134,
    "terminate called without an active exception"; 6 of 129 2-process FSDP2 runs on this machine, none of
    100 with this ending). Any other command ends as Python does."""
    ended: list[object] = []

    class Ended(Exception):
        pass

    def _exit(status: int) -> None:
        ended.append(("os._exit", status))
        raise Ended

    worker = threading.Thread(target=lambda: (time.sleep(0.2), ended.append("thread")))
    monkeypatch.setattr(cli.threading, "enumerate", lambda: [threading.main_thread(), worker])
    monkeypatch.setattr(cli.atexit, "_run_exitfuncs", lambda: ended.append("exit handlers"))
    monkeypatch.setattr(cli.os, "_exit", _exit)
    monkeypatch.setattr(cli, "main", lambda: True)
    worker.start()
    with pytest.raises(Ended):
        cli.console()
    assert ended == ["thread", "exit handlers", ("os._exit", 0)]

    ended.clear()
    monkeypatch.setattr(cli, "main", lambda: False)
    cli.console()  # returns: the interpreter is finalized as usual
    assert ended == []
