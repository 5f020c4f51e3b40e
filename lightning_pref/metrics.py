"""Preference metrics under TRL-compatible keys, exact over many batches and devices.

Each key is a ``MeanMetric`` holding a weighted *sum* and *count* of per-example values, reduced across ranks by
summation, so an epoch value is the mean over all examples seen, not a mean of per-batch means.
"""

from __future__ import annotations

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


class PreferenceMetrics(nn.Module):
    """One ``MeanMetric`` per key for one stage."""

    def __init__(self) -> None:
        super().__init__()
        # ModuleDict keys cannot contain "." but "/" is fine; they are also the logged names.
        self.means = nn.ModuleDict({key: MeanMetric() for key in KEYS})

    def update(
        self, out: LossOutput, policy: SequenceLogps, paired: bool, weights: Tensor | None = None
    ) -> dict[str, MeanMetric]:
        """Accumulate a batch and return the metrics that received values (to be passed to ``self.log``).

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
        loss_weights = w_chosen if out.losses.shape[0] == n else weights
        values["loss"] = (out.losses.detach(), loss_weights)
        updated = {}
        for key, (value, weight) in values.items():
            if value.numel() == 0:  # e.g. a KTO batch with only desirable examples
                continue
            # forward() both accumulates the epoch state and caches this batch's value for per-step logging.
            self.means[key](value.float(), 1.0 if weight is None else weight)
            updated[key] = self.means[key]
        return updated
