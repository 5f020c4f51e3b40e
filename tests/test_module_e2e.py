"""A few real optimizer steps on a tiny random model on CPU, asserting the invariants of the module."""

from __future__ import annotations

import csv
import math
from functools import partial

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_pref import PreferenceDataModule, PreferenceModule
from lightning_pref.metrics import KEYS
from tests.support import TINY


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Fit 4 steps with validation; return the module, its initial weights and the run directory."""
    tmp = tmp_path_factory.mktemp("fit")
    from lightning_pref.data.synthetic import generate
    from tests.support import write_jsonl

    records, _ = generate(24, seed=5)
    data = write_jsonl(tmp / "pairs.jsonl", records)
    model = PreferenceModule(policy=TINY, tokenizer="byte", optimizer=partial(torch.optim.AdamW, lr=1e-2))
    dm = PreferenceDataModule(train=str(data), val=str(data), tokenizer=model.tokenizer, batch_size=4)
    model.configure_model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(
        max_steps=4, val_check_interval=4, log_every_n_steps=1, logger=CSVLogger(tmp), enable_progress_bar=False,
        callbacks=[ModelCheckpoint(dirpath=tmp / "ckpt", save_last=True)], enable_model_summary=False,
    )
    trainer.fit(model, dm)
    return model, initial, tmp, trainer


def test_policy_changed_reference_bit_identical_and_eval(trained):
    model, initial, _, _ = trained
    state = model.state_dict()
    policy_keys = [k for k in state if k.startswith("policy.")]
    reference_keys = [k for k in state if k.startswith("reference.")]
    assert policy_keys and len(policy_keys) == len(reference_keys)
    assert any(not torch.equal(state[k], initial[k]) for k in policy_keys)
    assert all(torch.equal(state[k], initial[k]) for k in reference_keys)
    assert not any(m.training for m in model.reference.modules())
    assert not any(p.requires_grad for p in model.reference.parameters())


def test_metrics_finite_under_documented_keys(trained):
    _, _, tmp, trainer = trained
    rows = list(csv.DictReader(open(trainer.logger.log_dir + "/metrics.csv")))
    columns = set(rows[0])
    for stage in ("train", "val"):
        for key in KEYS:
            assert f"{stage}/{key}" in columns
            values = [float(r[f"{stage}/{key}"]) for r in rows if r[f"{stage}/{key}"]]
            assert values and all(math.isfinite(v) for v in values), (stage, key)
    first_loss = float(next(r["train/loss"] for r in rows if r["train/loss"]))
    assert first_loss == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0


def test_checkpoint_has_no_reference_and_reloads(trained):
    model, initial, tmp, _ = trained
    checkpoint = torch.load(tmp / "ckpt" / "last.ckpt", weights_only=False)
    assert not any(k.startswith("reference.") for k in checkpoint["state_dict"])
    assert any(k.startswith("policy.") for k in checkpoint["state_dict"])
    reloaded = PreferenceModule.load_from_checkpoint(tmp / "ckpt" / "last.ckpt")
    for key, value in model.state_dict().items():
        expected = initial[key] if key.startswith("reference.") else value
        assert torch.equal(reloaded.state_dict()[key], expected), key


def test_loss_needs_pairs_refuses_unpaired_batch(tmp_path):
    from lightning_pref.data.collate import PreferenceCollator
    from lightning_pref.data.tokenize import Encoded
    from lightning_pref.errors import UserInputError

    model = PreferenceModule(policy=TINY, tokenizer="byte")
    model.configure_model()
    batch = PreferenceCollator(0)([Encoded([1], [2], label=True), Encoded([3], [4], label=False)])
    with pytest.raises(UserInputError, match="needs paired data"):
        model.training_step(batch, 0)
