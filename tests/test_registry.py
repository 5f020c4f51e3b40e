"""Registry: registration, lookup, error messages and entry-point discovery."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Any

import pytest

import lightning_pref.losses  # noqa: F401 - registers the built-in losses
from lightning_pref import registry
from lightning_pref.losses import DPOLoss, PreferenceLoss
from lightning_pref.registry import (
    LOSSES,
    UnknownPluginError,
    get_loss,
    get_loss_class,
    list_losses,
    load_plugins,
    register_loss,
)


@pytest.fixture(autouse=True)
def restore_registry(monkeypatch):
    """Undo every registration a test makes, so other test modules see the built-in registry."""
    monkeypatch.setattr(registry.LOSSES, "classes", dict(registry.LOSSES.classes))
    monkeypatch.setattr(registry.LOSSES, "plugins_loaded", registry.LOSSES.plugins_loaded)


class ToyLoss(PreferenceLoss):
    """A loss defined by a test."""

    paper = "none"

    def __init__(self, beta: float = 0.5) -> None:
        super().__init__()
        self.beta = beta


@dataclass
class FakeDist:
    name: str


@dataclass
class FakeEntryPoint:
    """The parts of ``importlib.metadata.EntryPoint`` that ``load_plugins`` uses."""

    name: str
    value: str
    dist: FakeDist | None
    target: Any

    group: str = LOSSES.group

    def load(self) -> Any:
        if isinstance(self.target, Exception):
            raise self.target
        return self.target


def fake_entry_points(monkeypatch, *eps: FakeEntryPoint) -> None:
    def entry_points(**params):
        assert set(params) == {"group"}
        return list(eps) if params["group"] == LOSSES.group else []  # other registries: no plugins

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def test_register_get_and_list():
    register_loss("toy")(ToyLoss)
    assert "toy" in list_losses()
    assert list_losses() == sorted(list_losses())
    assert get_loss_class("toy") is ToyLoss
    assert ToyLoss.registered_name == "toy"
    loss = get_loss("toy", beta=2.0)
    assert isinstance(loss, ToyLoss) and loss.beta == 2.0


def test_builtins_are_registered():
    assert get_loss_class("dpo") is DPOLoss
    assert isinstance(get_loss("dpo", beta=0.3), DPOLoss)


def test_registering_the_same_class_twice_is_allowed():
    register_loss("toy")(ToyLoss)
    register_loss("toy")(ToyLoss)  # e.g. a module imported twice
    assert get_loss_class("toy") is ToyLoss


def test_duplicate_name_with_different_class_raises():
    with pytest.raises(ValueError, match="'dpo' is already registered by lightning_pref.losses.dpo.DPOLoss"):
        register_loss("dpo")(ToyLoss)
    assert get_loss_class("dpo") is DPOLoss


def test_unknown_name_suggests_closest_and_lists_registered():
    with pytest.raises(UnknownPluginError) as info:
        get_loss("dpp")
    message = str(info.value)
    assert "Unknown loss 'dpp'." in message
    assert "Did you mean 'dpo'?" in message
    assert "Registered losses: " in message
    for name in ("cdpo", "dpo", "ipo", "kto", "weighted"):
        assert name in message
    assert isinstance(info.value, KeyError)  # callers catching KeyError keep working


def test_unknown_name_without_close_match_has_no_suggestion():
    with pytest.raises(UnknownPluginError) as info:
        get_loss_class("completely-different")
    assert "Did you mean" not in str(info.value)


def test_entry_point_class_is_registered_under_its_name(monkeypatch):
    fake_entry_points(
        monkeypatch, FakeEntryPoint("toy_plugin", "toy_pkg.losses:ToyLoss", FakeDist("toy-pkg"), ToyLoss)
    )
    load_plugins(force=True)
    assert "toy_plugin" in list_losses()
    assert get_loss_class("toy_plugin") is ToyLoss
    assert isinstance(get_loss("toy_plugin"), ToyLoss)


def test_entry_point_of_an_already_registered_class_is_not_duplicated(monkeypatch):
    fake_entry_points(monkeypatch, FakeEntryPoint("dpo_alias", "pkg:DPOLoss", FakeDist("pkg"), DPOLoss))
    load_plugins(force=True)
    assert "dpo_alias" not in list_losses()


def test_broken_entry_point_warns_with_distribution_and_does_not_crash(monkeypatch):
    fake_entry_points(
        monkeypatch,
        FakeEntryPoint(
            "broken", "broken_pkg.losses:Nope", FakeDist("broken-dist"), ImportError("no module broken_pkg")
        ),
        FakeEntryPoint("toy_plugin", "toy_pkg.losses:ToyLoss", FakeDist("toy-pkg"), ToyLoss),
    )
    with pytest.warns(UserWarning, match=r"'broken'.*broken-dist.*ImportError: no module broken_pkg"):
        load_plugins(force=True)
    assert "broken" not in list_losses()
    assert get_loss_class("toy_plugin") is ToyLoss  # later plugins still load


def test_broken_entry_point_without_distribution(monkeypatch):
    fake_entry_points(monkeypatch, FakeEntryPoint("broken", "x:y", None, RuntimeError("boom")))
    with pytest.warns(UserWarning, match="unknown distribution"):
        load_plugins(force=True)


def test_plugins_load_once_unless_forced(monkeypatch):
    calls = []

    def entry_points(**params):
        calls.append(params)
        return []

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    load_plugins(force=True)  # every registry: losses, reward losses, judges, advantage estimators
    list_losses()
    get_loss_class("dpo")
    groups = [c["group"] for c in calls]
    assert groups == [r.group for r in registry.REGISTRIES]
    assert groups == ["lightning_pref.losses", "lightning_pref.reward_losses", "lightning_pref.judges",
                      "lightning_pref.advantages"]
    load_plugins(force=True)
    assert len(calls) == 2 * len(groups)


def test_plugin_whose_name_is_taken_warns_instead_of_crashing(monkeypatch):
    from lightning_pref.losses import DPOLoss

    fake_entry_points(monkeypatch, FakeEntryPoint("dpo", "pkg:ToyLoss", FakeDist("clash-dist"), ToyLoss))
    with pytest.warns(UserWarning, match=r"'dpo'.*clash-dist.*already registered"):
        load_plugins(force=True)
    assert get_loss_class("dpo") is DPOLoss


def test_plugin_that_is_not_a_class_warns(monkeypatch):
    fake_entry_points(monkeypatch, FakeEntryPoint("fn", "pkg:fn", FakeDist("fn-dist"), lambda: None))
    with pytest.warns(UserWarning, match=r"'fn'.*fn-dist.*not a PreferenceLoss class"):
        load_plugins(force=True)
    assert "fn" not in list_losses()
