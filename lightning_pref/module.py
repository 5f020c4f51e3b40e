"""``PreferenceModule``: a policy, its reference, and a preference loss plugin trained on pairs (or KTO's unpaired
examples)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_pref import kl, layout
from lightning_pref.errors import UserInputError
from lightning_pref.losses import DPOLoss, PreferenceLoss
from lightning_pref.losses.base import checked_call
from lightning_pref.metrics import PreferenceMetrics, batch_means, per_example
from lightning_pref.models import ModelSpec
from lightning_pref.policy import PolicyModule
from lightning_pref.reference import check_reference_mode
from lightning_pref.registry import LOSSES
from lightning_pref.types import KLRows, PreferenceBatch, SequenceLogps

_PROGRESS_BAR = ("train/loss", "train/rewards/accuracies")


class PreferenceModule(PolicyModule):
    """Preference optimization of a causal LM against a reference.

    Args:
        policy: the model to train: a Hugging Face hub id or local directory (``AutoModelForCausalLM``), or a
            dict of ``transformers`` config fields for a randomly initialized model.
        loss: a loss plugin (``lightning-pref losses`` lists them), or its ``{class_path, init_args}`` spec as
            checkpoints keep it; default DPO with beta=0.1.
        **kwargs: ``PolicyModule``'s arguments: the reference (``reference``, ``reference_mode``, TR-DPO's
            ``ref_sync_steps``, ...), loading (``tokenizer``, ``dtype``, ``model_kwargs``, ...), ``optimizer``,
            ``scheduler``, ``generation`` and the rest.
    """

    plugin_registries = {"loss": LOSSES}
    not_hparams = (*PolicyModule.not_hparams, "loss")

    def __init__(self, policy: ModelSpec, loss: PreferenceLoss | None = None, **kwargs: Any) -> None:
        super().__init__(policy, **kwargs)
        self.loss = self.plugin(loss, LOSSES, DPOLoss, "model.loss")
        check_reference_mode(self.hparams.reference_mode, self.loss.requires_reference,
                             self.loss.requires_kl_baseline, type(self.loss).__name__, self.hparams.ref_sync_steps)
        self.check_reference_used(type(self.loss).__name__)
        self.train_metrics, self.val_metrics, self.test_metrics = (PreferenceMetrics() for _ in range(3))

    @property
    def needs_reference(self) -> bool:
        return self.loss.requires_reference

    def on_train_start(self) -> None:
        size = getattr(self.trainer.train_dataloader, "batch_size", None)
        if self.loss.requires_kl_baseline and size is not None and size < 2:
            raise UserInputError(
                f"data.batch_size: {size} example per device leaves KTO's KL baseline without a mismatched pair (each "
                "prompt is paired with another example's completion in the same batch), so z0 would be 0 for the whole "
                "run; use data.batch_size >= 2"
            )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The policy's preparation, and KTO's mismatched rows (on the CPU) when the loss needs a KL baseline."""
        batch = super().on_before_batch_transfer(batch, dataloader_idx)
        if isinstance(batch, PreferenceBatch):
            self.kl_rows(batch)
        return batch

    # ---------------------------------------------------------------------------------------------- training
    def forward(self, batch: PreferenceBatch) -> tuple[SequenceLogps, SequenceLogps | None, Tensor | None]:
        """Policy and reference log-probs of a batch (one concatenated forward of chosen and rejected rows), and
        KTO's KL baseline ``z0`` when the loss needs one (``None`` otherwise)."""
        kl_rows = self.kl_rows(batch)
        # The reference first: nothing of the policy's graph is alive during its forward, and only the loss runs
        # between the policy's forward and its backward (the top decoder layer's activations, which activation
        # checkpointing leaves in place, then wait for nothing else; models.enable_activation_checkpointing).
        reference = self.reference.logps(self.policy, batch, kl_rows) if self.loss.requires_reference else None
        logps, tokens, policy_kl = self.policy(batch.input_ids, batch.attention_mask, batch.response_mask, kl_rows,
                                               batch.packed)
        policy = SequenceLogps.split(logps, tokens, batch.num_chosen)  # (N,) -> (B,), (B,)
        if reference is None:
            return policy, None, None
        ref_logps, reference_kl = reference
        strategy = self.trainer.strategy if self._trainer is not None else None
        z0 = kl.kl_baseline(policy_kl - reference_kl, strategy) if kl_rows is not None else None
        return policy, SequenceLogps.split(ref_logps.to(logps.dtype), tokens, batch.num_chosen), z0

    def kl_rows(self, batch: PreferenceBatch) -> KLRows | None:
        """The batch's mismatched rows when the loss needs a KL baseline, else ``None``."""
        if not self.loss.requires_kl_baseline:
            return None
        if batch.kl_rows is None:  # built before the batch moves (on_before_batch_transfer), else here
            rows = kl.mismatched_rows(layout.sequences(batch), self.tokenizer.pad_token_id,
                                      packed=batch.packed is not None)
            batch.kl_rows = self.transfer_batch_to_device(rows, batch.device, 0)
        return batch.kl_rows

    def _step(self, batch: PreferenceBatch, stage: str) -> tuple[Tensor, SequenceLogps]:
        if self.loss.paired and not batch.paired:
            raise UserInputError(
                f"model.loss: {type(self.loss).__name__} needs paired data (prompt/chosen/rejected) but the "
                f"{stage} batch is unpaired; use paired data or an unpaired loss such as kto"
            )
        policy, reference, kl_baseline = self(batch)
        out = checked_call(self.loss, policy, reference, kl_baseline)
        loss = out.losses.mean()
        values = per_example(out, policy, batch.paired, batch.weights)
        clash = sorted(set(out.metrics) & {*values, "loss"})
        if clash:  # the plugin's value would replace the module's own (or Lightning refuses the second log)
            raise UserInputError(f"model.loss: {type(self.loss).__name__} returned metrics named {clash}, which the "
                                 f"module logs itself ({stage}/{clash[0]}); give them names of their own")
        batch_size = batch.num_chosen if batch.paired else batch.num_sequences
        if stage == "train":  # per step: this batch's values, logged as plain tensors in one call; a batch whose
            # every row weighs 0 (an on-policy step where every prompt tied) has no values to report
            if batch.weights is None or bool(batch.weights.any()):
                self.log_metrics("train", batch_means(values) | out.metrics, batch_size, _PROGRESS_BAR)
        else:  # per epoch: exact means over every example on every device
            for key, metric in getattr(self, f"{stage}_metrics").update(values).items():
                self.log(f"{stage}/{key}", metric, on_step=False, on_epoch=True, batch_size=batch_size)
            for key, value in out.metrics.items():
                self.log(f"{stage}/{key}", value, on_step=False, on_epoch=True, batch_size=batch_size, sync_dist=True)
        return loss, policy

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor:
        loss, policy = self._step(batch, "train")
        passes = self.reference.passes if self.loss.requires_reference else 0
        kl_tokens = int(batch.kl_rows.attention_mask.sum()) if batch.kl_rows is not None else 0
        self.log_batch_cost(batch, passes, kl_tokens * (1 + passes))
        return self.checked_loss(loss, torch.cat([policy.chosen, policy.rejected]), batch_idx)

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        self._step(batch, "test")
