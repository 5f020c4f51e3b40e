"""A pretrained checkpoint trains exactly as configured: parameter dtype from the precision (not the checkpoint's
storage dtype), train mode whatever mode ``from_pretrained`` returned, dropout off by default, ``model_kwargs``,
and the run-length-aware schedule of the recipes. Tiny checkpoints saved with ``save_pretrained`` here; the real
SmolLM2 checkpoint is in ``tests/test_real_model.py``."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from lightning_pref import PreferenceModule
from lightning_pref.errors import UserInputError
from lightning_pref.models import load_causal_lm, parameter_dtype
from lightning_pref.schedules import WarmupDecay
from tests.support import TINY, tiny_fit


def _checkpoint(tmp_path: Path, tokenizer, config: dict, dtype=torch.bfloat16) -> str:
    """A tiny model saved as a hub checkpoint is: ``save_pretrained`` in ``dtype`` (bf16 by default)."""
    out = tmp_path / f"ckpt-{config['model_type']}"
    load_causal_lm(config, field="test", vocab_size=len(tokenizer)).to(dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


class Record(Callback):
    """Records, at the first training batch, the modes and dtypes the step really runs with."""

    def __init__(self) -> None:
        self.seen: dict = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.seen:
            return
        policy, reference = pl_module.policy, pl_module.reference
        self.seen = {
            "policy_training": {m.training for m in policy.modules()},
            "reference_training": {m.training for m in reference.modules()} if reference is not None else set(),
            "policy_dtypes": {p.dtype for p in policy.parameters()},
            "reference_dtypes": {p.dtype for p in reference.parameters()} if reference is not None else set(),
        }


def _fit(path: str, pairs_file, steps: int = 1, precision: str = "32-true", callbacks=(), **module_kwargs):
    model = PreferenceModule(policy=path, optimizer=partial(torch.optim.AdamW, lr=1e-3), **module_kwargs)
    losses = tiny_fit(model, pairs_file, steps, callbacks=callbacks, data_options={"max_length": 64},
                      precision=precision)
    return model, losses


@pytest.mark.parametrize(
    ("precision", "override", "expected"),
    [
        ("32-true", None, torch.float32), ("32", None, torch.float32), ("bf16-mixed", None, torch.float32),
        ("16-mixed", None, torch.float32), ("bf16-true", None, torch.bfloat16), ("16-true", None, torch.float16),
        ("64-true", None, torch.float64), ("transformer-engine", None, torch.float32), (None, None, torch.float32),
        ("32-true", "bfloat16", torch.bfloat16), ("bf16-true", "float32", torch.float32),
    ],
)
def test_parameter_dtype_follows_lightning_precision(precision, override, expected):
    assert parameter_dtype(precision, override) == expected


@pytest.mark.parametrize(
    ("precision", "module_kwargs", "policy_dtype", "reference_dtype"),
    [
        ("32-true", {}, torch.float32, torch.float32),
        ("bf16-mixed", {}, torch.float32, torch.float32),
        ("bf16-true", {}, torch.bfloat16, torch.bfloat16),
        ("32-true", {"reference_dtype": "bfloat16"}, torch.float32, torch.bfloat16),
        ("32-true", {"dtype": "bfloat16"}, torch.bfloat16, torch.bfloat16),
    ],
)
def test_bf16_checkpoint_trains_the_configured_dtype(
    tmp_path, tokenizer, pairs_file, caplog, precision, module_kwargs, policy_dtype, reference_dtype
):
    """A bf16 checkpoint under 32-true trains fp32 master weights (transformers 5 alone would load bf16)."""
    path = _checkpoint(tmp_path, tokenizer, TINY)
    record = Record()
    model, losses = _fit(path, pairs_file, precision=precision, callbacks=[record], **module_kwargs)
    assert record.seen["policy_dtypes"] == {policy_dtype}
    assert record.seen["reference_dtypes"] == {reference_dtype}
    assert math.isfinite(losses[0])
    line = next(r.getMessage() for r in caplog.records if "policy parameters" in r.getMessage())
    assert str(policy_dtype).removeprefix("torch.") in line and "checkpoint bfloat16" in line


@pytest.mark.parametrize(("setting", "method", "checkpointed"), [  # of 4 layers
    (True, "uniform", [0, 1, 2]), (2, "uniform", [0, 2]), (2, "block", [0, 1]), (9, "block", [0, 1, 2])])
def test_loaded_policy_trains_in_train_mode_and_checkpointing_runs(tmp_path, tokenizer, pairs_file, monkeypatch,
                                                                    setting, method, checkpointed):
    """from_pretrained returns eval mode; training must still run in train mode, so activation checkpointing
    (gated on ``training``) really recomputes, while the reference stays in eval mode. ``true`` checkpoints every
    decoder layer, an integer n every n-th from the first (``uniform``) or the bottom n (``block``); the top
    layer (3), whose recompute would free nothing, never."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    path = _checkpoint(tmp_path, tokenizer, {**TINY, "num_hidden_layers": 4})
    calls = []
    original = GradientCheckpointingLayer.__call__

    def counting(self, *args, **kwargs):
        if self.gradient_checkpointing and self.training:
            calls.append(self.self_attn.layer_idx)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GradientCheckpointingLayer, "__call__", counting)
    record = Record()
    _fit(path, pairs_file, callbacks=[record], gradient_checkpointing=setting,
         gradient_checkpointing_method=method)
    assert record.seen["policy_training"] == {True}
    assert record.seen["reference_training"] == {False}
    assert calls == checkpointed  # one checkpointed forward per checkpointed layer


def test_checkpointing_some_layers_gives_the_same_losses(tmp_path, tokenizer, pairs_file):
    """Recomputing a layer reproduces its activations: every layer, every 2nd, the bottom 2 or none train
    alike."""
    path = _checkpoint(tmp_path, tokenizer, {**TINY, "num_hidden_layers": 3}, dtype=torch.float32)
    losses = {}
    for setting, method in ((False, "uniform"), (True, "uniform"), (2, "uniform"), (2, "block")):
        torch.manual_seed(0)
        losses[setting, method] = _fit(path, pairs_file, steps=3, gradient_checkpointing=setting,
                                       gradient_checkpointing_method=method)[1]
    none = losses[False, "uniform"]
    assert len(none) == 3 and none[-1] != none[0]  # it trained
    for key, values in losses.items():
        assert values == pytest.approx(none, rel=1e-5), key


def test_bottom_layers_are_refused_where_the_model_does_not_name_its_decoder_layers(tmp_path, tokenizer,
                                                                                    pairs_file):
    """GPT-2 keeps its blocks in ``transformer.h``: ``block`` cannot tell which layers are the bottom n, so it
    says so rather than checkpointing every layer."""
    path = _checkpoint(tmp_path, tokenizer, _DROPOUT_CONFIGS["gpt2"])
    with pytest.raises(UserInputError, match=r"^model\.gradient_checkpointing_method: block recomputes the "
                       r"bottom 1 decoder layers, and GPT2LMHeadModel does not name its decoder layers .*; "
                       r"set it to uniform$"):
        _fit(path, pairs_file, gradient_checkpointing=1, gradient_checkpointing_method="block")


def test_every_nth_layer_is_refused_where_transformers_cannot_leave_layers_out(tmp_path, tokenizer, pairs_file,
                                                                               monkeypatch):
    """A transformers whose checkpointing method has no ``every_n_layers`` would checkpoint every layer (or
    raise a TypeError): one line naming the option instead."""
    from transformers import PreTrainedModel

    def enable(self, activation_checkpointing_kwargs=None):  # the signature before every_n_layers
        raise AssertionError("must not be called")

    monkeypatch.setattr(PreTrainedModel, "activation_checkpointing_enable", enable)
    path = _checkpoint(tmp_path, tokenizer, {**TINY, "num_hidden_layers": 3})
    with pytest.raises(UserInputError, match=r"^model\.gradient_checkpointing: 2 \(recompute one decoder layer in 2\) "
                       r"needs transformers' every_n_layers, .*; upgrade transformers, or set it to true"):
        _fit(path, pairs_file, gradient_checkpointing=2)


_DROPOUT_CONFIGS = {
    "llama": {**TINY, "attention_dropout": 0.5},  # a float rate read by the attention when training
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 128, "resid_pdrop": 0.5,
             "embd_pdrop": 0.5, "attn_pdrop": 0.5},  # nn.Dropout modules
}


@pytest.mark.parametrize("architecture", list(_DROPOUT_CONFIGS))
def test_dropout_off_by_default_so_the_first_dpo_loss_is_ln2(tmp_path, tokenizer, pairs_file, architecture):
    path = _checkpoint(tmp_path, tokenizer, _DROPOUT_CONFIGS[architecture], dtype=torch.float32)
    _, losses = _fit(path, pairs_file)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference, up to fp32 rounding
    torch.manual_seed(0)
    _, with_dropout = _fit(path, pairs_file, disable_dropout=False)  # the policy trains with its dropout on
    assert abs(with_dropout[0] - math.log(2)) > 1e-5  # (a tiny random model: small but far above rounding)


def test_model_kwargs_reach_from_pretrained_and_remote_code_stays_off(tmp_path, tokenizer, monkeypatch):
    from transformers import AutoModelForCausalLM

    path = _checkpoint(tmp_path, tokenizer, TINY)
    seen = []
    original = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **kw: seen.append(kw) or original(*a, **kw))
    model = PreferenceModule(policy=path, model_kwargs={"attn_implementation": "eager"})
    model.configure_model()
    assert model.policy.model.config._attn_implementation == "eager"
    assert seen[0]["trust_remote_code"] is False and seen[0]["dtype"] == torch.float32
    seen.clear()
    PreferenceModule(policy=path, reference=path, model_kwargs={"trust_remote_code": True},
                     reference_model_kwargs={"attn_implementation": "sdpa"}).configure_model()
    assert [kw["trust_remote_code"] for kw in seen] == [True, False]  # reference: its own kwargs
    assert seen[1]["attn_implementation"] == "sdpa"


def test_unknown_model_kwarg_is_one_line(tmp_path, tokenizer):
    from lightning_pref.errors import UserInputError

    path = _checkpoint(tmp_path, tokenizer, TINY)
    with pytest.raises(UserInputError, match=r"model.policy: cannot load"):
        PreferenceModule(policy=path, model_kwargs={"attn_implementation": "no-such-kernel"}).configure_model()


def test_warmup_decay_by_hand():
    """warmup=0.25 of 8 steps = 2 steps: (s+1)/3, then cosine from 1 to min_ratio over the remaining 6."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = WarmupDecay(optimizer, warmup=0.25, decay="cosine", min_ratio=0.1)
    assert schedule.total_steps is None
    schedule.set_total_steps(8)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(9):
        optimizer.step()
        schedule.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(7)]
    assert lrs[:9] == pytest.approx([1 / 3, 2 / 3, *cosine])
    assert lrs[9] == pytest.approx(0.1)  # stays at the floor past the end
    linear = WarmupDecay(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0), warmup=2, decay="linear",
                         total_steps=6)
    assert [linear.factor(s) for s in range(7)] == pytest.approx([1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25, 0.0])


def test_warmup_decay_takes_the_run_length_from_the_trainer(tmp_path, tokenizer, pairs_file):
    lrs = []

    class LR(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    path = _checkpoint(tmp_path, tokenizer, TINY)
    scheduler = partial(WarmupDecay, warmup=0.5, decay="linear")
    model, _ = _fit(path, pairs_file, steps=4, callbacks=[LR()], scheduler=scheduler)
    assert model.lr_schedulers().total_steps == 4
    assert lrs == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 0.5e-3])
