"""The two ways to add a loss, as shipped in ``examples/``: an installable package registered through an entry
point (``examples/custom_loss_plugin``) and the ``@register_loss`` decorator in a script
(``examples/decorator_loss.py``). Installation is simulated: no pip, no network."""

from __future__ import annotations

import csv
import importlib.metadata
import math
import runpy

import pytest
import torch

from lightning_pref import registry
from lightning_pref.cli import main
from lightning_pref.losses import DPOLoss
from lightning_pref.registry import LOSSES, get_loss_class, list_losses, load_plugins
from lightning_pref.types import SequenceLogps
from tests.support import REPO

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

PLUGIN_DIR = REPO / "examples" / "custom_loss_plugin"
DECORATOR_SCRIPT = REPO / "examples" / "decorator_loss.py"
CONFIG = str(REPO / "configs" / "dpo.yaml")
TWO_STEPS = [
    "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1",
    "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
]


@pytest.fixture(autouse=True)
def restore_registry(monkeypatch):
    """Undo every registration a test makes, so other test modules see the built-in registry."""
    monkeypatch.setattr(registry.LOSSES, "classes", dict(registry.LOSSES.classes))
    monkeypatch.setattr(registry.LOSSES, "plugins_loaded", registry.LOSSES.plugins_loaded)
    monkeypatch.setattr("sys.argv", ["lightning-pref"])  # LightningCLI warns about pytest's own flags


def _plugin_entry_points() -> list[importlib.metadata.EntryPoint]:
    """The entry points the example package declares, read from its pyproject.toml as pip would."""
    project = tomllib.loads((PLUGIN_DIR / "pyproject.toml").read_text())["project"]
    assert project["name"] == "lightning-pref-example-loss"
    assert project["dependencies"] == ["lightning-pref"]
    declared = project["entry-points"][LOSSES.group]
    return [importlib.metadata.EntryPoint(name, value, LOSSES.group) for name, value in declared.items()]


@pytest.fixture
def installed_plugin(monkeypatch):
    """Simulate ``pip install examples/custom_loss_plugin``: its package importable, its entry point visible."""
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    eps = _plugin_entry_points()

    def entry_points(**params):
        assert set(params) == {"group"}
        return eps if params["group"] == LOSSES.group else []

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    load_plugins(force=True)
    return eps


def _metrics(root) -> list[dict[str, str]]:
    (path,) = root.glob("lightning_logs/version_*/metrics.csv")
    return list(csv.DictReader(path.open()))


def _train_losses(root) -> list[float]:
    losses = [float(r["train/loss"]) for r in _metrics(root) if r.get("train/loss")]
    assert losses and all(math.isfinite(v) for v in losses)
    return losses


def test_entry_point_registers_the_plugin_and_it_trains(installed_plugin, tmp_path, pairs_file, capsys):
    (ep,) = installed_plugin
    assert ep.name == "dpop" and ep.value == "lp_example_loss.dpop:DPOPLoss"
    assert "dpop" in list_losses()
    cls = get_loss_class("dpop")
    assert (cls.__module__, cls.__name__, cls.registered_name) == ("lp_example_loss.dpop", "DPOPLoss", "dpop")

    main(["losses"])
    assert "DPOPLoss" in capsys.readouterr().out

    out = tmp_path / "out"
    main([
        "fit", "--config", CONFIG, "--model.loss", "dpop", "--model.loss.dpop_lambda", "5",
        "--data.train", str(pairs_file), "--data.val", str(pairs_file), "--data.batch_size", "4",
        "--trainer.default_root_dir", str(out), *TWO_STEPS,
    ])
    assert len(_train_losses(out)) == 2
    (config,) = out.glob("lightning_logs/version_*/config.yaml")
    assert "lp_example_loss.dpop.DPOPLoss" in config.read_text()
    assert any(r.get("train/dpop_penalty") for r in _metrics(out))  # the loss's extra metric is logged


def test_dpop_matches_hand_computed_values(installed_plugin):
    r"""beta = 0.5, lambda = 2; log-ratios h = policy - reference.

    Pair 1: h_w = -10 - (-9) = -1, h_l = -12 - (-10) = -2; penalty max(0, -h_w) = 1.
        z = 0.5 * (-1 - (-2) - 2 * 1) = -0.5,  loss = -log sigma(-0.5) = log(1 + e^0.5) = 0.9740769841
        (DPO: -log sigma(0.5) = log(1 + e^-0.5) = 0.4740769841; the penalty costs exactly 0.5 more here.)
        d loss / d policy.chosen = -sigma(-z) * dz/dh_w = -sigma(0.5) * 0.5 * (1 + 2) = -0.6224593312 * 1.5
                                 = -0.9336889969   (DPO: -sigma(-0.5) * 0.5 = -0.1887703344)
    Pair 2: h_w = -8 - (-9) = 1, h_l = -11 - (-10) = -1; penalty 0, so DPO's value:
        z = 0.5 * (1 + 1) = 1,  loss = log(1 + e^-1) = 0.3132616875,
        d loss / d policy.chosen = -sigma(-1) * 0.5 = -0.2689414214 * 0.5 = -0.1344707107
    Rewards beta * h: chosen (-0.5, 0.5), rejected (-1.0, -0.5). Mean penalty (1 + 0) / 2 = 0.5.
    """
    loss = get_loss_class("dpop")(beta=0.5, dpop_lambda=2.0)
    tokens = torch.tensor([3, 3])
    chosen = torch.tensor([-10.0, -8.0], dtype=torch.float64, requires_grad=True)
    policy = SequenceLogps(chosen, torch.tensor([-12.0, -11.0], dtype=torch.float64), tokens, tokens)
    reference = SequenceLogps(torch.tensor([-9.0, -9.0], dtype=torch.float64),
                              torch.tensor([-10.0, -10.0], dtype=torch.float64), tokens, tokens)
    out = loss(policy, reference)
    torch.testing.assert_close(out.losses, torch.tensor([0.9740769841, 0.3132616875], dtype=torch.float64))
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([-0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-1.0, -0.5], dtype=torch.float64))
    torch.testing.assert_close(out.metrics["dpop_penalty"], torch.tensor(0.5, dtype=torch.float64))
    out.losses.sum().backward()
    torch.testing.assert_close(chosen.grad, torch.tensor([-0.9336889969, -0.1344707107], dtype=torch.float64))

    # lambda = 0 is DPO.
    dpo = DPOLoss(beta=0.5)(policy, reference).losses
    torch.testing.assert_close(get_loss_class("dpop")(beta=0.5, dpop_lambda=0.0)(policy, reference).losses, dpo)
    torch.testing.assert_close(dpo, torch.tensor([0.4740769841, 0.3132616875], dtype=torch.float64))


@pytest.mark.parametrize("kwargs", [{"beta": 0.0}, {"dpop_lambda": -1.0}])
def test_dpop_rejects_bad_arguments(installed_plugin, kwargs):
    with pytest.raises(ValueError, match="dpop: "):
        get_loss_class("dpop")(**kwargs)


def test_decorator_script_registers_and_trains(tmp_path, monkeypatch):
    out = tmp_path / "out"
    # Extra arguments are passed through to `lightning-pref fit`; the embedded default data is used.
    monkeypatch.setattr("sys.argv", [str(DECORATOR_SCRIPT), "--trainer.default_root_dir", str(out), *TWO_STEPS])
    namespace = runpy.run_path(str(DECORATOR_SCRIPT), run_name="__main__")
    assert get_loss_class("gpo_exp") is namespace["ExponentialGPOLoss"]
    losses = _train_losses(out)
    assert len(losses) == 2
    assert losses[0] == pytest.approx(1.0)  # exp(-beta * 0): the policy starts equal to the reference
