"""Each seed loss learns the embedded synthetic task through its shipped config, within a small CPU budget."""

from __future__ import annotations

import csv
import glob
import json

import pytest
import torch

from lightning_pref import PreferenceModule
from lightning_pref.cli import main
from lightning_pref.data.collate import PreferenceCollator
from lightning_pref.data.tokenize import Encoded
from tests.support import REPO, TINY, with_kl_rows, write_jsonl


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightning-pref"])


def _rows(root) -> list[dict[str, str]]:
    (path,) = glob.glob(str(root / "lightning_logs/version_0/metrics.csv"))
    return list(csv.DictReader(open(path)))


@pytest.mark.parametrize("loss", ["dpo", "cdpo", "ipo", "kto"])
def test_seed_loss_learns_heldout_preference(tmp_path, loss):
    """At step 0 policy == reference, every reward is 0 and no pair is ranked correctly (accuracy 0; chance
    is 0.5). After 12 steps the held-out accuracy must be clearly above chance."""
    main([
        "fit", "--config", str(REPO / f"configs/{loss}.yaml"), "--trainer.max_steps", "12",
        "--trainer.val_check_interval", "12", "--trainer.default_root_dir", str(tmp_path),
    ])
    rows = _rows(tmp_path)
    (accuracy,) = [float(r["val/rewards/accuracies"]) for r in rows if r["val/rewards/accuracies"]]
    assert accuracy >= 0.8, f"{loss}: held-out reward accuracy {accuracy}"


def test_kto_unpaired_train_paired_val(tmp_path):
    """`--data.train unpaired.jsonl --data.val pairs.jsonl`: KTO trains on labels, validation is pairwise."""
    pairs = [json.loads(line) for line in open(REPO / "lightning_pref/assets/synthetic_val.jsonl")][:32]
    unpaired = [{"prompt": p["prompt"], "completion": p["chosen"], "label": True} for p in pairs[:20]]
    unpaired += [{"prompt": p["prompt"], "completion": p["rejected"], "label": False} for p in pairs[20:]]
    main([
        "fit", "--config", str(REPO / "configs/kto.yaml"),
        "--data.train", str(write_jsonl(tmp_path / "unpaired.jsonl", unpaired)),
        "--data.val", str(write_jsonl(tmp_path / "pairs.jsonl", pairs)), "--data.batch_size", "5",
        "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.log_every_n_steps", "1",
        "--trainer.default_root_dir", str(tmp_path / "out"),
    ])
    rows = _rows(tmp_path / "out")
    columns = {k for r in rows for k, v in r.items() if v}
    assert {"train/loss", "train/kl", "train/rewards/chosen", "val/rewards/accuracies", "val/kl"} <= columns
    assert "train/rewards/accuracies" not in columns  # unpaired training batches have no pairs to rank


def _kto_module() -> PreferenceModule:
    from lightning_pref.losses import KTOLoss

    model = PreferenceModule(policy=TINY, tokenizer="byte", loss=KTOLoss())
    model.configure_model()
    with torch.no_grad():  # make the policy differ from the reference so z0 is not trivially 0
        for p in model.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_kl_baseline_is_mean_logratio_of_mismatched_pairs_clamped():
    model = _kto_module()
    examples = [Encoded([5, 6], [7, 8, 1], label=True), Encoded([9], [10, 1], label=False),
                Encoded([11, 12, 13], [14, 1], label=True)]
    batch = with_kl_rows(PreferenceCollator(0)(examples))
    args = batch.kl_rows[:3]
    with torch.no_grad():
        expected = (model.policy(*args)[0] - model.reference(*args)[0]).mean().clamp(min=0)
    assert expected > 0  # so the clamp does not hide a wrong mean
    torch.testing.assert_close(model(batch)[2], expected)


@pytest.mark.parametrize("labels", [[True, True], [False, False, False]])
def test_kto_batch_with_one_kind_of_example(labels):
    """Only desirable or only undesirable examples: z0 from their mismatched pairs, finite per-example losses."""
    model = _kto_module()
    examples = [Encoded([i + 3], [i + 20, 1], label=label) for i, label in enumerate(labels)]
    batch = with_kl_rows(PreferenceCollator(0)(examples))
    policy, reference, kl = model(batch)
    out = model.loss(policy, reference, kl_baseline=kl)
    assert out.losses.shape == (len(labels),) and torch.isfinite(out.losses).all()


def test_kl_baseline_without_mismatched_rows_is_zero():
    """One pair: both rows share the prompt, so there is no mismatched pair; z0 = 0/0 -> 0, no crash."""
    model = _kto_module()
    batch = with_kl_rows(PreferenceCollator(0)([Encoded([5, 6], [7, 1], [8, 1])]))
    assert batch.kl_rows.input_ids.shape[0] == 0
    policy, reference, kl = model(batch)
    assert kl.item() == 0.0
    out = model.loss(policy, reference, kl_baseline=kl)
    assert torch.isfinite(out.losses).all()
