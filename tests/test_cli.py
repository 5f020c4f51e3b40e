"""The ``lightning-pref`` CLI: shipped configs, loss names, real loading from a local directory, errors."""

from __future__ import annotations

import csv
import glob

import pytest
import torch
import yaml

from lightning_pref.cli import main
from tests.conftest import REPO, TINY

# Every shipped config and the loss it selects; a config added without an entry here fails the count below.
CONFIGS = {
    "configs/dpo.yaml": "lightning_pref.losses.dpo.DPOLoss",
    "configs/cdpo.yaml": "lightning_pref.losses.cdpo.CDPOLoss",
    "configs/ipo.yaml": "lightning_pref.losses.ipo.IPOLoss",
    "configs/kto.yaml": "lightning_pref.losses.kto.KTOLoss",
    "configs/recipes/dpo.yaml": "lightning_pref.losses.dpo.DPOLoss",
    "configs/recipes/cdpo.yaml": "lightning_pref.losses.cdpo.CDPOLoss",
    "configs/recipes/ipo.yaml": "lightning_pref.losses.ipo.IPOLoss",
    "configs/recipes/kto.yaml": "lightning_pref.losses.kto.KTOLoss",
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
        recipe = ["--model.policy", "./my-sft-model"] if "/recipes/" in path else []  # recipes leave it to you
        config = _print_config(capsys, "fit", "--config", str(REPO / path), *recipe)
        assert config["model"]["loss"]["class_path"] == loss, path
        if recipe:  # settings for a pretrained model, not the demo's
            assert config["model"]["optimizer"]["init_args"]["lr"] <= 1e-6
            assert config["model"]["scheduler"]["class_path"] == "lightning_pref.schedules.WarmupDecay"


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


def test_fit_then_validate_from_local_model_directory(tmp_path, pairs_file, tokenizer):
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
    assert glob.glob(str(out / "lightning_logs/version_1/metrics.csv"))  # a new version, nothing overwritten


def test_missing_model_directory_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs/dpo.yaml"), "--model.policy", str(tmp_path / "nope"),
              "--model.tokenizer", "byte", "--trainer.max_steps", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "model.policy: cannot load" in err and "Traceback" not in err


def test_lightning_misconfiguration_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs/dpo.yaml"), "--trainer.val_check_interval", "0.5"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "val_check_interval" in err and "Traceback" not in err
