"""Edges where training used to do something else quietly: each test fails on the code before its fix."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_pref import PreferenceModule
from lightning_pref.cli import main
from lightning_pref.errors import UserInputError
from lightning_pref.losses import KTOLoss
from lightning_pref.models import load_causal_lm
from tests.support import REPO, TINY, tiny_fit, with_kl_rows


def _module(policy=TINY, **kwargs) -> PreferenceModule:
    kwargs.setdefault("optimizer", partial(torch.optim.AdamW, lr=1e-2))
    tokenizer = {} if isinstance(policy, str) else {"tokenizer": "byte"}
    return PreferenceModule(policy=policy, **tokenizer, **kwargs)


def _save(path, tokenizer, seed: int) -> str:
    load_causal_lm(TINY, field="test", seed=seed, vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


# --------------------------------------------------------------------------------------- precomputed reference
def test_precomputed_cache_follows_the_weights_not_the_path(tmp_path, tokenizer, pairs_file, monkeypatch):
    """An SFT model retrained into the same directory must not reuse the old log-probs."""
    import lightning_pref.precompute as precompute

    calls = []
    real = precompute.score_examples
    monkeypatch.setattr(precompute, "score_examples", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = str(tmp_path / "cache")
    path = _save(tmp_path / "sft", tokenizer, seed=1)
    tiny_fit(_module(path, reference_mode="precomputed", reference_cache_dir=cache), pairs_file, steps=1)
    tiny_fit(_module(path, reference_mode="precomputed", reference_cache_dir=cache), pairs_file, steps=1)
    assert len(calls) == 1  # same weights: a hit
    _save(tmp_path / "sft", tokenizer, seed=2)  # retrained into the same directory
    torch.manual_seed(0)
    fresh = tiny_fit(_module(path, reference_mode="precomputed", reference_cache_dir=cache), pairs_file, steps=2)
    assert len(calls) == 2  # a miss
    torch.manual_seed(0)
    expected = tiny_fit(_module(path), pairs_file, steps=2)  # model mode on the new weights
    torch.testing.assert_close(torch.tensor(fresh), torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_precomputed_scored_under_the_trainers_precision(tmp_path, pairs_file):
    """Under bf16-mixed, precomputed and model mode agree at step 0 (the table is scored under the same autocast),
    and the table is keyed by the precision."""
    cache = tmp_path / "cache"
    steps = {}
    for mode in ("model", "precomputed"):
        torch.manual_seed(0)
        cached = {"reference_cache_dir": str(cache)} if mode == "precomputed" else {}
        steps[mode] = tiny_fit(_module(reference_mode=mode, **cached), pairs_file, steps=1,
                           precision="bf16-mixed")
    # autocast rounds both to bf16; fp32 scoring of the table (the old behaviour) was off by ~1e-3 here
    assert steps["precomputed"][0] == pytest.approx(steps["model"][0], abs=2e-4)
    assert steps["model"][0] == pytest.approx(math.log(2), abs=1e-6)
    tiny_fit(_module(reference_mode="precomputed", reference_cache_dir=str(cache)), pairs_file, steps=1)  # 32-true
    assert len(list(cache.glob("*.pt"))) == 2


# --------------------------------------------------------------------------------------------------- TR-DPO
def test_tr_dpo_syncs_once_per_optimizer_step_under_accumulation(tmp_path, pairs_file):
    """Sync every 2 optimizer steps with α=0.6 and 2 accumulated batches per step, for 3 steps: one sync, after
    step 2, so ref = 0.4 ref0 + 0.6 policy_2, also in the saved checkpoint. (Syncing per batch also synced on
    the first batch of step 3, while global_step was still 2: 0.16 ref0 + 0.84 policy_2.)"""
    model = _module(ref_sync_steps=2, ref_sync_alpha=0.6)
    model.configure_model()
    initial = {k: v.clone() for k, v in model.reference.state_dict().items()}
    at_step_2 = {}

    class Snapshot(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == 2 and not at_step_2:
                at_step_2.update({k: v.clone() for k, v in pl_module.policy.state_dict().items()})

    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    tiny_fit(model, pairs_file, steps=3, accumulate_grad_batches=2, callbacks=[Snapshot(), checkpoint],
         enable_checkpointing=True)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    for key, value in model.reference.state_dict().items():
        expected = 0.4 * initial[key] + 0.6 * at_step_2[key]
        torch.testing.assert_close(value, expected)
        torch.testing.assert_close(saved["reference." + key], expected)


# ------------------------------------------------------------------------------------------------------ KTO
def test_kto_with_one_example_per_device_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightning-pref"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs/kto.yaml"), "--data.batch_size", "1",
              "--trainer.default_root_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    # Refused by the module that trains the loss, once the data it is fed is known (after the data summary): the
    # data module knows nothing about losses. The error is the last line, one line, without a traceback.
    assert exit_info.value.code == 2 and "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("error: data.batch_size") and ">= 2" in last


def test_kto_prompt_sharing_under_activation_checkpointing_wrappers(tiny_model, monkeypatch):
    """Lightning's activation_checkpointing_policy wraps layers in checkpoint wrappers: backward recomputes them,
    so the policy's KL rows must not reuse (and crop) the cache of that pass; the reference's may."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lightning_pref.logps import SequenceScorer
    from tests.test_logps import _kto_batch

    batch = _kto_batch()
    plain = SequenceScorer(tiny_model)
    logps, _, kl_logps = plain(batch.input_ids, batch.attention_mask, batch.response_mask, batch.kl_rows)
    logps.sum().backward()
    expected = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    tiny_model.zero_grad()

    apply_activation_checkpointing(tiny_model, check_fn=lambda m: isinstance(m, LlamaDecoderLayer))
    tiny_model.train()
    shared = []
    original = SequenceScorer._score_continuations
    monkeypatch.setattr(SequenceScorer, "_score_continuations", lambda *a: shared.append(1) or original(*a))
    scorer = SequenceScorer(tiny_model)
    got, _, got_kl = scorer(batch.input_ids, batch.attention_mask, batch.response_mask, batch.kl_rows)
    got.sum().backward()  # recomputes the wrapped layers: crashed on a cropped, re-indexed cache
    assert shared == []
    torch.testing.assert_close(got_kl, kl_logps)
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in tiny_model.named_parameters()}
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():  # a pass without gradient (the reference's) still shares
        scorer(batch.input_ids, batch.attention_mask, batch.response_mask, batch.kl_rows)
    assert shared == [1]


def test_every_rank_runs_a_kl_forward_even_without_kl_rows(tiny_model, monkeypatch):
    """A rank whose rows all share one prompt has no KL rows; it must still run the forward the others run, or
    a sharded strategy's collectives no longer match."""
    from lightning_pref.data.collate import PreferenceCollator
    from lightning_pref.data.tokenize import Encoded
    from lightning_pref.logps import SequenceScorer

    scorer = SequenceScorer(tiny_model)
    scorer.checked = True  # count the batch's own forwards only
    calls = []
    body = tiny_model.model.forward
    monkeypatch.setattr(tiny_model.model, "forward", lambda *a, **k: calls.append(1) or body(*a, **k))
    collate = PreferenceCollator(0)
    for examples in ([Encoded([5, 6], [7, 1], label=True), Encoded([5, 6], [8, 1], label=False)],  # one prompt
                     [Encoded([5, 6], [7, 1], label=True), Encoded([9], [8, 1], label=False)]):
        batch = with_kl_rows(collate(examples))
        calls.clear()
        kl_logps = scorer(batch.input_ids, batch.attention_mask, batch.response_mask, batch.kl_rows)[2]
        assert len(calls) == 2 and kl_logps.shape == (len(batch.kl_rows.prompt_rows),)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_load_from_checkpoint_rebuilds_the_trained_loss(tmp_path, pairs_file):
    model = _module(loss=KTOLoss(beta=0.3, desirable_weight=1.2))
    tiny_fit(model, pairs_file, steps=1, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)],
         enable_checkpointing=True)
    reloaded = PreferenceModule.load_from_checkpoint(tmp_path / "last.ckpt")
    assert isinstance(reloaded.loss, KTOLoss)
    assert (reloaded.loss.beta, reloaded.loss.desirable_weight) == (0.3, 1.2)


def test_a_checkpoint_missing_a_policy_key_fails_loudly(tmp_path, pairs_file):
    model = _module()
    tiny_fit(model, pairs_file, steps=1, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)],
         enable_checkpointing=True)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert not any(k.startswith("reference.") for k in checkpoint["state_dict"])  # allowed to be missing
    del checkpoint["state_dict"]["policy.model.model.norm.weight"]
    torch.save(checkpoint, tmp_path / "broken.ckpt")
    with pytest.raises(UserInputError, match=r"missing policy\.model\.model\.norm\.weight"):
        PreferenceModule.load_from_checkpoint(tmp_path / "broken.ckpt")


# ---------------------------------------------------------------------------------------------------- YAML
def test_only_model_loss_is_resolved_as_a_loss_name(tmp_path, capsys, monkeypatch):
    import yaml

    monkeypatch.setattr("sys.argv", ["lightning-pref"])
    extra = tmp_path / "extra.yaml"
    extra.write_text(
        "model:\n  loss: ipo\n"
        "trainer:\n  callbacks:\n    - class_path: tests.support.Tagged\n      init_args: {loss: dpo}\n"
    )
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs/dpo.yaml"), "--config", str(extra), "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["loss"]["class_path"] == "lightning_pref.losses.ipo.IPOLoss"
    assert config["trainer"]["callbacks"][0]["init_args"]["loss"] == "dpo"  # a callback's own argument


# -------------------------------------------------------------------------------------------- non-finite skip
def test_nonfinite_skip_leaves_other_accumulated_batches(pairs_file):
    """With 2 accumulated batches, one non-finite: the step is taken with the good batch's gradient only."""
    from tests.support import NaNAtCall

    torch.manual_seed(0)
    skipped = _module(loss=NaNAtCall(at=1), on_nonfinite="skip")
    with pytest.warns(UserWarning, match="batch skipped"):
        losses = tiny_fit(skipped, pairs_file, steps=1, accumulate_grad_batches=2)
    assert losses[1] == 0.0 and math.isfinite(losses[0])
    torch.manual_seed(0)
    alone = _module()
    tiny_fit(alone, pairs_file, steps=1, accumulate_grad_batches=2, limit_train_batches=1)  # the good batch alone
    # the same single batch's gradient (halved by the accumulation in the skipped run: AdamW is scale-invariant)
    for (name, a), b in zip(skipped.policy.named_parameters(), alone.policy.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
