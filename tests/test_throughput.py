"""Throughput in the logs: Lightning's ThroughputMonitor over real tokens, the FLOPs estimate, padding."""

from __future__ import annotations

import csv

import pytest
from lightning.pytorch import Callback

from lightning_pref.cli import main
from lightning_pref.throughput import flop_parameters
from tests.support import REPO


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightning-pref"])


class Tokens(Callback):
    """Real tokens and sequences of every training batch, counted from the padded tensors."""

    seen: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        Tokens.seen.append((int(batch.attention_mask.sum()), batch.attention_mask.shape[0]))


def _run(tmp_path, *extra: str) -> list[dict]:
    main(["fit", "--config", str(REPO / "configs/dpo.yaml"), "--trainer.max_steps", "4", "--trainer.log_every_n_steps",
          "1", "--throughput.window_size", "3", "--trainer.limit_val_batches", "0", "--trainer.default_root_dir",
          str(tmp_path), "--progress_bar.refresh_rate", "0", *extra])
    return list(csv.DictReader(open(tmp_path / "lightning_logs/version_0/metrics.csv")))


def test_tokens_per_second_count_real_tokens_and_flops_are_8n_per_token(tmp_path):
    Tokens.seen = []
    rows = _run(tmp_path, "--trainer.callbacks+=tests.test_throughput.Tokens", "--data.packing", "false")
    (last,) = [r for r in rows if r.get("train/device/items_per_sec") and r["step"] == "3"]
    items, samples = float(last["train/device/items_per_sec"]), float(last["train/device/samples_per_sec"])
    # a window of 3 batches: rates over the time between the first and the third batch's end (batches 3 and 4)
    tokens, sequences = map(sum, zip(*Tokens.seen[2:4], strict=True))
    assert items / samples == pytest.approx(tokens / sequences, rel=1e-6)
    # DPO with a reference model: 6N per token for the policy's forward and backward, 2N for the reference's
    from lightning_pref import PreferenceModule

    module = PreferenceModule(policy=_config(), tokenizer="byte")
    module.configure_model()
    n = flop_parameters(module.policy.lm)
    embedding = module.policy.lm.get_input_embeddings().weight.numel()
    assert n == sum(p.numel() for p in module.policy.lm.parameters()) - embedding  # untied head counted
    assert float(last["train/device/flops_per_sec"]) / items == pytest.approx(8 * n, rel=1e-6)
    padding = [float(r["train/padding_fraction"]) for r in rows if r.get("train/padding_fraction")]
    assert len(padding) == 4 and all(0 <= p < 1 for p in padding)


def test_shared_prompts_cut_the_tokens_the_model_runs(tmp_path):
    """The same batches, padded and with shared prompts: fewer real tokens (each prompt once), less padding."""
    padded = _run(tmp_path / "padded", "--data.packing", "false")
    shared = _run(tmp_path / "shared", "--data.packing", "shared")

    def first(rows, key):
        return next(float(r[key]) for r in rows if r.get(key))

    assert first(shared, "train/padding_fraction") < first(padded, "train/padding_fraction")
    tokens = [first(rows, "train/device/items_per_sec") / first(rows, "train/device/samples_per_sec")
              for rows in (padded, shared)]
    assert tokens[1] < tokens[0]


def _config() -> dict:
    import yaml

    return yaml.safe_load((REPO / "configs/dpo.yaml").read_text())["model"]["policy"]
