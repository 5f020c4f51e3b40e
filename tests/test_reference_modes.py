"""Reference modes (model / none / adapter), reference dtype, TR-DPO sync and non-finite losses."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from lightning_pref import LossOutput, PreferenceLoss, PreferenceModule
from lightning_pref.errors import TrainingError, UserInputError
from lightning_pref.losses import DPOLoss, SimPOLoss
from lightning_pref.types import PreferenceBatch
from tests.support import TINY, tiny_fit


def _module(**kwargs) -> PreferenceModule:
    kwargs.setdefault("optimizer", partial(torch.optim.AdamW, lr=1e-2))
    return PreferenceModule(policy=TINY, tokenizer="byte", **kwargs)


def test_none_mode_refuses_a_loss_that_needs_a_reference():
    with pytest.raises(UserInputError, match="reference_mode: 'none'.*DPOLoss requires them"):
        _module(loss=DPOLoss(), reference_mode="none")


def test_ref_sync_needs_model_mode():
    with pytest.raises(UserInputError, match="ref_sync_steps"):
        _module(reference_mode="none", loss=SimPOLoss(), ref_sync_steps=2)


def test_none_mode_with_reference_free_loss_builds_no_reference(pairs_file):
    model = _module(loss=SimPOLoss(), reference_mode="none")
    tiny_fit(model, pairs_file)
    assert not list(model.reference.parameters())


def test_reference_dtype(pairs_file):
    model = _module(reference_dtype="bfloat16")
    model.configure_model()
    assert {p.dtype for p in model.reference.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.policy.parameters()} == {torch.float32}
    tiny_fit(model, pairs_file)


def test_adapter_mode_reference_is_policy_with_adapters_disabled(pairs_file):
    pytest.importorskip("peft")
    model = _module(reference_mode="adapter", lora={"r": 4, "lora_alpha": 8})
    model.configure_model()
    assert not list(model.reference.parameters())
    trainable = [n for n, p in model.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    batch_ids = torch.randint(3, 200, (2, 10))
    mask, response = torch.ones_like(batch_ids), torch.zeros_like(batch_ids, dtype=torch.bool)
    response[:, 5:] = True
    batch = PreferenceBatch(batch_ids, mask, response, num_chosen=1)
    before = model.reference.logps(model.policy, batch)[0]
    # LoRA's B matrices start at zero, so the policy starts equal to its reference: DPO loss ln 2
    torch.testing.assert_close(model.policy(batch_ids, mask, response)[0], before)
    tiny_fit(model, pairs_file, steps=3)
    with torch.no_grad():
        after_policy = model.policy(batch_ids, mask, response)[0]
    torch.testing.assert_close(model.reference.logps(model.policy, batch)[0], before)  # base untouched
    assert not torch.allclose(after_policy, before)


def test_tr_dpo_soft_sync(pairs_file):
    model = _module(ref_sync_steps=2, ref_sync_alpha=0.5)
    model.configure_model()
    initial = {k: v.clone() for k, v in model.reference.state_dict().items()}
    tiny_fit(model, pairs_file, steps=2)
    policy = model.policy.state_dict()
    for key, value in model.reference.state_dict().items():
        torch.testing.assert_close(value, 0.5 * initial[key] + 0.5 * policy[key])
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert any(k.startswith("reference.") for k in checkpoint["state_dict"])  # a moved reference is saved


class _NaNLoss(PreferenceLoss):
    requires_reference = False
    paper = "test"

    def forward(self, policy, reference, *, kl_baseline=None) -> LossOutput:
        zeros = torch.zeros_like(policy.chosen).detach()
        return LossOutput(policy.chosen * math.nan, zeros, zeros)


def test_nonfinite_loss_stops_with_step_and_batch(pairs_file):
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 0 \(epoch 0, batch 0\)"):
        tiny_fit(_module(loss=_NaNLoss(), reference_mode="none"), pairs_file)


def test_nonfinite_loss_skip(pairs_file):
    model = _module(loss=_NaNLoss(), reference_mode="none", on_nonfinite="skip")
    model.configure_model()
    initial = {k: v.clone() for k, v in model.policy.state_dict().items()}
    with pytest.warns(UserWarning, match="non-finite loss at step 0.*skipped"):
        tiny_fit(model, pairs_file, steps=2, max_epochs=1, limit_train_batches=2)
    assert all(torch.equal(v, initial[k]) for k, v in model.policy.state_dict().items())


def _losses(pairs_file, **kwargs) -> list[float]:
    torch.manual_seed(0)
    return tiny_fit(_module(**kwargs), pairs_file, steps=3)


def test_precomputed_matches_model_mode_and_reuses_its_cache(pairs_file, tmp_path, monkeypatch):
    import lightning_pref.precompute as precompute

    calls = []
    real = precompute.score_examples
    monkeypatch.setattr(precompute, "score_examples", lambda *a, **k: calls.append(1) or real(*a, **k))
    model_mode = _losses(pairs_file)
    first = _losses(pairs_file, reference_mode="precomputed", reference_cache_dir=str(tmp_path))
    assert len(calls) == 1  # one split (train) computed
    torch.testing.assert_close(torch.tensor(first), torch.tensor(model_mode), rtol=1e-5, atol=1e-6)
    assert first[0] == pytest.approx(math.log(2), abs=1e-6)
    second = _losses(pairs_file, reference_mode="precomputed", reference_cache_dir=str(tmp_path))
    assert len(calls) == 1 and second == first  # the cache was reused, nothing recomputed
    assert len(list(tmp_path.glob("*.pt"))) == 1


def test_precomputed_holds_no_reference_model(pairs_file, tmp_path):
    model = _module(reference_mode="precomputed", reference_cache_dir=str(tmp_path))
    tiny_fit(model, pairs_file, steps=1)
    assert not list(model.reference.parameters())


def test_precomputed_refuses_kto():
    from lightning_pref.losses import KTOLoss

    with pytest.raises(UserInputError, match="'precomputed' cannot serve KTOLoss"):
        _module(loss=KTOLoss(), reference_mode="precomputed")


@pytest.mark.parametrize("mode", ["model", "adapter"])
def test_reference_forward_runs_before_the_policys(pairs_file, monkeypatch, mode):
    """A training step scores the reference first, so that only the loss runs between the policy's forward and
    its backward: nothing of the policy's graph (the top decoder layer's activations, which checkpointing leaves
    in place) waits through the reference's forward. ``adapter``: the reference is the policy's own forward with
    its adapters off, inside the reference's call."""
    if mode == "adapter":
        pytest.importorskip("peft")
    model = _module(reference_mode=mode, **({"lora": {"r": 4, "lora_alpha": 8}} if mode == "adapter" else {}))
    model.configure_model()
    events: list[str] = []

    def recorded(method, name):
        def call(*args, **kwargs):
            events.append(f"{name} start")
            try:
                return method(*args, **kwargs)
            finally:
                events.append(f"{name} end")
        return call

    monkeypatch.setattr(model.reference, "logps", recorded(model.reference.logps, "reference"))
    monkeypatch.setattr(model.policy, "forward", recorded(model.policy.forward, "policy"))
    tiny_fit(model, pairs_file, steps=1)
    inner = ["policy start", "policy end"] if mode == "adapter" else []
    assert events == ["reference start", *inner, "reference end", "policy start", "policy end"]


def test_gradient_checkpointing_gives_the_same_losses(pairs_file):
    assert _losses(pairs_file, gradient_checkpointing=True) == pytest.approx(_losses(pairs_file), rel=1e-5)


def test_adapter_policy_exports_merged(pairs_file, tmp_path):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from lightning_pref.export import save_policy

    model = _module(reference_mode="adapter", lora={"r": 4, "lora_alpha": 8})
    tiny_fit(model, pairs_file, steps=2)
    save_policy(model, tmp_path / "merged")
    ids = torch.randint(3, 200, (1, 12))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, model.policy.model.eval()(ids).logits, rtol=1e-4, atol=1e-5)
    assert not any("lora" in k for k in exported.state_dict())


def test_export_of_a_lora_run_through_the_cli_adapter_then_merged_over_it(pairs_file, tmp_path, capsys, monkeypatch):
    """``export --adapter_only true`` wrote the adapter, then crashed reading a config.json peft does not write
    (exit 1); exporting the merged model over it with ``--overwrite true`` left the adapter's files beside the
    merged weights, and transformers loaded the adapter on top of them (logits off by 0.03). Now the adapter
    export says how to load it, and an overwrite replaces the model files: the same model as a clean export."""
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from lightning_pref.cli import main
    from tests.support import REPO

    monkeypatch.setattr("sys.argv", ["lightning-pref"])
    main(["fit", "--config", str(REPO / "configs/dpo.yaml"), "--data.train", str(pairs_file), "--data.val", "null",
          "--data.batch_size", "4", "--trainer.max_steps", "2", "--model.reference_mode", "adapter",
          "--model.lora", "{r: 4, lora_alpha: 8}", "--trainer.default_root_dir", str(tmp_path / "run"),
          "--progress_bar.refresh_rate", "0"])
    ckpt = str(next((tmp_path / "run").glob("**/last.ckpt")))
    capsys.readouterr()
    main(["export", "--ckpt_path", ckpt, "--output_dir", str(tmp_path / "out"), "--adapter_only", "true"])
    assert "(load it with peft's AutoPeftModelForCausalLM.from_pretrained" in capsys.readouterr().out
    assert (tmp_path / "out/adapter_config.json").is_file()
    main(["export", "--ckpt_path", ckpt, "--output_dir", str(tmp_path / "out"), "--overwrite", "true"])
    main(["export", "--ckpt_path", ckpt, "--output_dir", str(tmp_path / "clean")])
    assert not list((tmp_path / "out").glob("adapter_*"))
    ids = torch.randint(3, 200, (1, 12))
    with torch.no_grad():
        over, clean = (AutoModelForCausalLM.from_pretrained(tmp_path / d).eval()(ids).logits for d in ("out", "clean"))
    torch.testing.assert_close(over, clean, rtol=0, atol=0)
