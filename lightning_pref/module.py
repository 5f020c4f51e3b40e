"""``PreferenceModule``: a trainable policy, a frozen reference, and a loss plugin."""

from __future__ import annotations

import copy
import re
import warnings
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lightning_pref.errors import UserInputError
from lightning_pref.logps import SequenceScorer
from lightning_pref.losses import DPOLoss, PreferenceLoss
from lightning_pref.metrics import PreferenceMetrics
from lightning_pref.models import ModelSpec, load_causal_lm, load_tokenizer
from lightning_pref.types import PreferenceBatch, SequenceLogps

# The frozen reference is in eval mode on purpose; Lightning warns about any eval-mode module at fit start.
warnings.filterwarnings("ignore", message=re.escape("Found ") + r"\d+ module\(s\) in eval mode at the start of training")

_REFERENCE_PREFIX = "reference."


class PreferenceModule(LightningModule):
    """Preference optimization of a causal LM against a frozen reference.

    Args:
        policy: the model to train: a Hugging Face hub id or local directory (``AutoModelForCausalLM``), or a
            dict of ``transformers`` config fields for a randomly initialized model.
        loss: a loss plugin (``lightning-pref losses`` lists them); default DPO with beta=0.1.
        reference: the frozen reference; ``None`` = a frozen copy of the policy's initial weights.
        tokenizer: hub id or local directory of the tokenizer, or ``"byte"`` for a byte-level tokenizer that
            needs no files; ``None`` = the policy's (requires ``policy`` to be a path or hub id).
        optimizer: optimizer factory, applied to the policy's parameters only.
        scheduler: optional learning-rate scheduler factory, stepped every optimizer step.
        init_seed: seed of the random initialization of a config-dict policy.
        chunk_size: response tokens per LM-head chunk when computing log-probs.
        response_only_head: apply the LM head only at response positions (same values, less work).
    """

    def __init__(
        self,
        policy: ModelSpec,
        loss: PreferenceLoss | None = None,
        reference: ModelSpec | None = None,
        tokenizer: str | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        init_seed: int = 0,
        chunk_size: int = 1024,
        response_only_head: bool = True,
    ) -> None:
        super().__init__()
        # The loss and the factories are kept by the CLI's config.yaml; as hparams they would be pickled objects.
        self.save_hyperparameters(ignore=["loss", "optimizer", "scheduler"])
        self.loss = loss if loss is not None else DPOLoss()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        if tokenizer is None and not isinstance(policy, str):
            raise UserInputError("model.tokenizer: required when model.policy is a config dict (e.g. 'byte')")
        self.tokenizer = load_tokenizer(tokenizer if tokenizer is not None else policy)
        self.policy: SequenceScorer | None = None
        self.reference: SequenceScorer | None = None
        self.train_metrics, self.val_metrics, self.test_metrics = (PreferenceMetrics() for _ in range(3))

    @property
    def requires_kl_baseline(self) -> bool:
        """Whether batches must carry mismatched pairs for KTO's KL baseline (linked to the data module)."""
        return self.loss.requires_kl_baseline

    def configure_model(self) -> None:
        """Build the models here, not in ``__init__``, so sharded strategies can materialize them per rank."""
        if self.policy is not None:  # called again by load_from_checkpoint and by each trainer entry point
            return
        hp = self.hparams
        config_fields = {"vocab_size": len(self.tokenizer), "pad_token_id": self.tokenizer.pad_token_id}
        policy = load_causal_lm(hp.policy, field="model.policy", seed=hp.init_seed, **config_fields)
        self.policy = SequenceScorer(policy, hp.chunk_size, hp.response_only_head)
        if self.loss.requires_reference:
            if hp.reference is None:
                reference = copy.deepcopy(policy)
            else:
                reference = load_causal_lm(hp.reference, field="model.reference", seed=hp.init_seed, **config_fields)
            scorer = SequenceScorer(reference, hp.chunk_size, hp.response_only_head)
            self.reference = scorer.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> PreferenceModule:
        """Switch modes, but keep the reference in eval mode (no dropout) even after validation."""
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory([p for p in self.policy.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def forward(self, batch: PreferenceBatch) -> tuple[SequenceLogps, SequenceLogps | None]:
        """Policy and reference log-probs of a batch: one concatenated forward of chosen and rejected rows."""
        logps, tokens = self.policy(batch.input_ids, batch.attention_mask, batch.response_mask)  # (N,), (N,)
        policy = SequenceLogps.split(logps, tokens, batch.num_chosen)
        reference = None
        if self.loss.requires_reference:
            with torch.no_grad():
                ref_logps, _ = self.reference(batch.input_ids, batch.attention_mask, batch.response_mask)
            reference = SequenceLogps.split(ref_logps, tokens, batch.num_chosen)
        return policy, reference

    @torch.no_grad()
    def kl_baseline(self, batch: PreferenceBatch) -> Tensor:
        """KTO's z0: mean policy-minus-reference log-prob of mismatched pairs over all ranks, clamped at 0."""
        if batch.kl_input_ids is None:
            raise UserInputError(
                f"{type(self.loss).__name__} needs a KL baseline but the batch has no mismatched pairs; "
                "set data.kl_baseline: true (the CLI links it automatically)"
            )
        args = (batch.kl_input_ids, batch.kl_attention_mask, batch.kl_response_mask)
        policy_logps, _ = self.policy(*args)
        reference_logps, _ = self.reference(*args)
        stats = torch.stack([(policy_logps - reference_logps).sum(), policy_logps.new_tensor(len(policy_logps))])
        stats = self.trainer.strategy.reduce(stats, reduce_op="sum") if self._trainer is not None else stats
        return (stats[0] / stats[1].clamp(min=1)).clamp(min=0).detach()

    def _step(self, batch: PreferenceBatch, stage: str) -> Tensor:
        if self.loss.paired and not batch.paired:
            raise UserInputError(
                f"model.loss: {type(self.loss).__name__} needs paired data (prompt/chosen/rejected) but the "
                f"{stage} batch is unpaired; use paired data or an unpaired loss such as kto"
            )
        policy, reference = self(batch)
        kl = self.kl_baseline(batch) if self.loss.requires_kl_baseline else None
        out = self.loss(policy, reference, kl_baseline=kl)
        loss = out.losses.mean()
        updated = getattr(self, f"{stage}_metrics").update(out, policy, batch.paired, batch.weights)
        on_step = stage == "train"
        batch_size = batch.num_chosen if batch.paired else batch.input_ids.shape[0]
        for key, metric in updated.items():
            shown = key in ("loss", "rewards/accuracies")
            self.log(f"{stage}/{key}", metric, on_step=on_step, on_epoch=not on_step, prog_bar=shown,
                     batch_size=batch_size)
        for key, value in out.metrics.items():
            self.log(f"{stage}/{key}", value, on_step=on_step, on_epoch=not on_step, batch_size=batch_size)
        return loss

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        self._step(batch, "test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave the frozen reference out: it is rebuilt from the config, and would double the file size."""
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(_REFERENCE_PREFIX)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Put the rebuilt reference's weights back so strict loading of the checkpoint succeeds."""
        if self.reference is not None:
            state = checkpoint["state_dict"]
            for key, value in self.reference.state_dict().items():
                state.setdefault(_REFERENCE_PREFIX + key, value)
