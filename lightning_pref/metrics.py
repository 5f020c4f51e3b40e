"""Preference metrics under TRL-compatible keys, exact over many batches and devices.

Each key is a ``MeanMetric`` holding a weighted *sum* and *count* of per-example values, reduced across ranks by
summation, so an epoch value is the mean over all examples seen, not a mean of per-batch means.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_pref.types import LossOutput, SequenceLogps

#: Documented metric names (prefixed with ``train/`` or ``val/``); reward = beta * (policy - reference) logp.
KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
PAIRWISE = ("rewards/accuracies", "rewards/margins")


def per_example(
    out: LossOutput, policy: SequenceLogps, paired: bool, weights: Tensor | None = None
) -> dict[str, tuple[Tensor, Tensor | None]]:
    """Per-example values and weights of each documented key for one batch (keys with no values left out).

    Args:
        out: the loss output (per-example losses and detached rewards).
        policy: policy log-probs of the batch.
        paired: whether chosen[i] pairs with rejected[i]; pairwise metrics are only defined then.
        weights: per-sequence weights ``[chosen; rejected]`` (0 for sampler-padded duplicates).
    """
    n = policy.chosen.shape[0]
    w_chosen = weights[:n] if weights is not None else None
    w_rejected = weights[n:] if weights is not None else None
    values: dict[str, tuple[Tensor, Tensor | None]] = {
        "rewards/chosen": (out.chosen_rewards, w_chosen),
        "rewards/rejected": (out.rejected_rewards, w_rejected),
        "logps/chosen": (policy.chosen.detach(), w_chosen),
        "logps/rejected": (policy.rejected.detach(), w_rejected),
    }
    if paired:
        margins = out.chosen_rewards - out.rejected_rewards  # (B,)
        values["rewards/margins"] = (margins, w_chosen)
        values["rewards/accuracies"] = ((margins > 0).float(), w_chosen)
    # Paired losses give one value per pair, unpaired ones one per sequence.
    values["loss"] = (out.losses.detach(), w_chosen if out.losses.shape[0] == n else weights)
    # e.g. a KTO batch with only desirable examples has no rejected values
    return {key: (value.float(), weight) for key, (value, weight) in values.items() if value.numel()}


def batch_means(values: dict[str, tuple[Tensor, Tensor | None]]) -> dict[str, Tensor]:
    """This batch's (weighted) mean of each key: the per-step training values."""
    return {
        key: value.mean() if weight is None else (value * weight).sum() / weight.sum().clamp(min=1e-12)
        for key, (value, weight) in values.items()
    }


class ExactMeans(nn.Module):
    """One ``MeanMetric`` per key, for exact means over a whole validation or test epoch.

    Args:
        keys: the metric names (``"/"`` allowed, ``"."`` not).
        dtype: the sums' dtype (float64 where a difference of means is taken, e.g. a variance from moments).
    """

    def __init__(self, keys: tuple[str, ...] = KEYS, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        # ModuleDict keys cannot contain "." but "/" is fine. Keep the default nan_strategy: with "disable",
        # torchmetrics 1.9 ignores the weights, and padded duplicates would count.
        self.means = nn.ModuleDict({key: MeanMetric().set_dtype(dtype) for key in keys})

    def update(self, values: dict[str, tuple[Tensor, Tensor | None]]) -> dict[str, MeanMetric]:
        """Accumulate a batch (from :func:`per_example`); return the updated metrics, to pass to ``self.log``."""
        for key, (value, weight) in values.items():
            dtype = self.means[key].dtype
            self.means[key].update(value.to(dtype), 1.0 if weight is None else weight.to(dtype))
        return {key: self.means[key] for key in values}


class PreferenceMetrics(ExactMeans):
    """:class:`ExactMeans` of the preference keys (:data:`KEYS`)."""
