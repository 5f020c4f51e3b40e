"""Metric values: per-step batch means and exact epoch means with sampler padding weighted out."""

from __future__ import annotations

import torch

from lightning_pref.metrics import PreferenceMetrics, batch_means, per_example
from lightning_pref.types import LossOutput, SequenceLogps


def _batch(margins: list[float]):
    chosen = torch.tensor(margins)
    out = LossOutput(losses=-chosen, chosen_rewards=chosen, rejected_rewards=torch.zeros(len(margins)))
    policy = SequenceLogps(chosen, torch.zeros(len(margins)), torch.ones(len(margins)), torch.ones(len(margins)))
    return out, policy


def test_batch_means_respect_weights():
    out, policy = _batch([1.0, -1.0, 3.0])
    weights = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0])  # the third pair is a padded duplicate
    means = batch_means(per_example(out, policy, paired=True, weights=weights))
    assert means["rewards/accuracies"].item() == 0.5  # (1 + 0) / 2, the duplicate not counted
    assert means["rewards/margins"].item() == 0.0


def test_epoch_mean_is_over_examples_not_batches():
    """Batches of 1 and 3 pairs: the mean over 4 pairs is (1 + 0 + 0 + 0) / 4, not the mean of batch means 0.5."""
    metrics = PreferenceMetrics()
    for margins in ([2.0], [-1.0, -1.0, -1.0]):
        metrics.update(per_example(*_batch(margins), paired=True))
    assert metrics.means["rewards/accuracies"].compute().item() == 0.25


def test_unpaired_batch_has_no_pairwise_keys():
    out, policy = _batch([1.0, 2.0])
    keys = per_example(out, policy, paired=False)
    assert "rewards/accuracies" not in keys and "rewards/margins" not in keys and "loss" in keys


def test_epoch_mean_leaves_out_weighted_duplicates():
    metrics = PreferenceMetrics()
    out, policy = _batch([2.0, -1.0])
    metrics.update(per_example(out, policy, paired=True, weights=torch.tensor([1.0, 0.0, 1.0, 0.0])))
    assert metrics.means["rewards/margins"].compute().item() == 2.0
