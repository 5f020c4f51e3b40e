"""FSDP wrapping on CPU: units found from the model, and never a unit mixing trainable and frozen parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.fsdp.wrap import _recursive_wrap

from lightning_pref import PreferenceModule
from lightning_pref.cli import main
from lightning_pref.logps import SequenceScorer
from lightning_pref.sharding import DecoderLayerWrapPolicy, decoder_layer_names
from tests.support import REPO, TINY


class Unit(nn.Module):
    """Stands in for FullyShardedDataParallel: records what FSDP's own traversal would wrap."""

    def __init__(self, module: nn.Module, **kwargs) -> None:
        super().__init__()
        self.module = module


def _wrap(module: nn.Module, policy) -> nn.Module:
    wrapped, _ = _recursive_wrap(module, policy, Unit, ignored_modules=set(), ignored_params=set(),
                                 only_wrap_children=True)
    return wrapped


def _units(root: nn.Module) -> list[list[nn.Parameter]]:
    """Parameters each unit would flatten: its own, excluding those of units nested inside it."""
    units = []
    for unit in [root, *(m for m in root.modules() if isinstance(m, Unit))]:
        nested = {id(p) for m in unit.modules() if isinstance(m, Unit) and m is not unit for p in m.parameters()}
        units.append([p for p in unit.parameters() if id(p) not in nested])
    return units


def _module() -> PreferenceModule:
    model = PreferenceModule(policy=TINY, tokenizer="byte")
    model.configure_model()
    return model


def test_decoder_layers_found_from_the_model():
    assert decoder_layer_names(_module().policy) == {"LlamaDecoderLayer"}


def test_wrap_policy_units_never_mix_requires_grad():
    model = _module()
    wrapped = _wrap(model, DecoderLayerWrapPolicy())
    units = [m.module for m in wrapped.modules() if isinstance(m, Unit)]
    layers = sum(type(m).__name__ == "LlamaDecoderLayer" for m in units)
    assert layers == 2 * TINY["num_hidden_layers"]  # policy's and reference's layers
    assert sum(isinstance(m, SequenceScorer) for m in units) == 2
    all_params = {id(p) for p in wrapped.parameters()}
    per_unit = _units(wrapped)
    assert sorted(id(p) for unit in per_unit for p in unit) == sorted(all_params)  # each param in one unit
    for params in per_unit:
        assert len({p.requires_grad for p in params}) <= 1
    assert per_unit[0] == []  # the LightningModule root holds nothing: embeddings/heads are in the scorer units


def test_a_policy_by_layer_class_alone_would_mix():
    """Why the scorers are units: wrapping only decoder layers leaves both embeddings in the root unit."""
    model = _module()
    wrapped = _wrap(model, lambda module, recurse, nonwrapped_numel=0: recurse or
                    type(module).__name__ == "LlamaDecoderLayer")
    assert len({p.requires_grad for p in _units(wrapped)[0]}) == 2


def test_activation_checkpointing_policy_is_the_policys_decoder_layers_only():
    """Not the frozen reference (nothing to save) and not a scorer (nested checkpointing, a whole extra policy
    forward in every backward, for every loss)."""
    model = _module()
    wrapped = _wrap(model, DecoderLayerWrapPolicy(trainable_only=True))
    units = [m.module for m in wrapped.modules() if isinstance(m, Unit)]
    assert [type(m).__name__ for m in units] == ["LlamaDecoderLayer"] * TINY["num_hidden_layers"]
    assert all(any(p.requires_grad for p in m.parameters()) for m in units)
    assert not any(isinstance(m, Unit) for m in wrapped.reference.modules())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "fsdp2"])
def test_strategy_configs_combine_with_a_loss_config(capsys, monkeypatch, strategy):
    import yaml

    monkeypatch.setattr("sys.argv", ["lightning-pref"])
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs/kto.yaml"), "--config",
              str(REPO / f"configs/strategy/{strategy}.yaml"), "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["loss"]["class_path"] == "lightning_pref.losses.kto.KTOLoss"
    assert config["trainer"]["strategy"]["class_path"].startswith("lightning.pytorch.strategies.")
    if strategy == "fsdp":
        init = config["trainer"]["strategy"]["init_args"]
        assert init["auto_wrap_policy"]["class_path"] == "lightning_pref.sharding.DecoderLayerWrapPolicy"
        assert init["activation_checkpointing_policy"]["init_args"] == {"trainable_only": True}
    assert torch.distributed.is_available()
