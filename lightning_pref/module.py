"""``PreferenceModule``: a trainable policy, a reference, and a loss plugin."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import random
import re
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_pref.data.chat import ChatTemplate
from lightning_pref.errors import TrainingError, UserInputError
from lightning_pref.generation import Completions, GenerationOptions, generate, left_pad, stop_token_ids
from lightning_pref.kl import kl_baseline
from lightning_pref.logps import SequenceScorer
from lightning_pref.losses import DPOLoss, PreferenceLoss
from lightning_pref.metrics import PreferenceMetrics, batch_means, per_example
from lightning_pref.models import (
    DtypeName,
    ModelSpec,
    disable_dropout,
    enable_activation_checkpointing,
    load_causal_lm,
    load_tokenizer,
    parameter_dtype,
    storage_dtype,
)
from lightning_pref.precompute import PrecomputedReference, weights_fingerprint
from lightning_pref.reference import ReferenceMode, apply_lora, check_reference_mode, soft_update
from lightning_pref.registry import UnknownLossError, loss_from_spec
from lightning_pref.sharding import apply_fsdp2, fsdp_mesh
from lightning_pref.types import KLRows, PreferenceBatch, PromptBatch, SequenceLogps

# The frozen reference is in eval mode on purpose; Lightning warns about any eval-mode module at fit start.
warnings.filterwarnings("ignore", message=re.escape("Found ") + r"\d+ module\(s\) in eval mode at the start of training")

_REFERENCE_PREFIX = "reference."
_PROGRESS_BAR = ("train/loss", "train/rewards/accuracies")


class PreferenceModule(LightningModule):
    """Preference optimization of a causal LM against a reference.

    Args:
        policy: the model to train: a Hugging Face hub id or local directory (``AutoModelForCausalLM``), or a
            dict of ``transformers`` config fields for a randomly initialized model.
        loss: a loss plugin (``lightning-pref losses`` lists them), or its ``{class_path, init_args}`` spec as
            checkpoints keep it; default DPO with beta=0.1.
        reference: the reference model; ``None`` = the policy's initial weights.
        reference_mode: ``model`` (a frozen reference model), ``precomputed`` (log-probs computed once before
            training and cached; no reference in memory), ``none`` (reference-free losses only) or ``adapter``
            (LoRA policy; the reference is the same model with adapters disabled). See ``reference.py``.
        reference_dtype: dtype of a ``model``-mode reference (``bfloat16`` halves its memory); ``None`` = the
            policy's.
        dtype: parameter dtype of the policy; ``None`` = from ``trainer.precision``: fp32 master weights under
            ``32-true`` and ``*-mixed``, bf16/fp16 under ``bf16-true``/``16-true`` (whatever the checkpoint's
            storage dtype).
        model_kwargs: more ``from_pretrained`` arguments for the policy (and its tokenizer's files), e.g.
            ``{attn_implementation: sdpa, revision: main}``; ``trust_remote_code`` is off unless set here.
        reference_model_kwargs: the same for ``reference``; ``None`` = ``model_kwargs``.
        disable_dropout: turn off the policy's dropout (as TRL), so policy and reference agree at step 0 and the
            DPO loss starts at ln 2.
        lora: ``peft.LoraConfig`` fields for ``adapter`` mode (default r=8, alpha=16, all linear layers).
        ref_sync_steps: TR-DPO: every this many optimizer steps, move the reference towards the policy.
        ref_sync_alpha: TR-DPO mixing weight: ref <- (1 - alpha) ref + alpha policy (1.0 = hard copy).
        reference_cache_dir: where ``precomputed`` reference log-probs are cached; ``None`` =
            ``~/.cache/lightning_pref/reference_logps``.
        tokenizer: hub id or local directory of the tokenizer, or ``"byte"`` for a byte-level tokenizer that
            needs no files; ``None`` = the policy's (requires ``policy`` to be a path or hub id).
        optimizer: optimizer factory, applied to the trainable policy parameters only.
        scheduler: optional learning-rate scheduler factory, stepped every optimizer step. One with a
            ``set_total_steps`` method (:class:`~lightning_pref.schedules.WarmupDecay`) is told the run's total
            optimizer steps.
        on_nonfinite: a NaN/inf loss stops training with the step and batch (``error``) or skips that batch on
            every device (``skip``).
        init_seed: seed of the random initialization of a config-dict policy.
        chunk_size: response tokens per LM-head chunk when computing log-probs; ``None`` = as many as keep a
            chunk's fp32 logits within 32 MB, at least 256 (1048 at an 8k vocabulary, 256 at 128k).
        response_only_head: apply the LM head only at response positions (same values, less work).
        gradient_checkpointing: recompute the policy's activations in backward (less memory, ~30% more time).
        compile: ``torch.compile`` the policy's forward (in place, so checkpoint keys do not change).
        generation: how completions are sampled (``predict``, ``evaluate``, ``SampleCompletions``).
    """

    def __init__(
        self,
        policy: ModelSpec,
        loss: PreferenceLoss | None = None,
        reference: ModelSpec | None = None,
        reference_mode: ReferenceMode = "model",
        reference_dtype: DtypeName | None = None,
        dtype: DtypeName | None = None,
        model_kwargs: dict[str, Any] | None = None,
        reference_model_kwargs: dict[str, Any] | None = None,
        disable_dropout: bool = True,
        lora: dict[str, Any] | None = None,
        ref_sync_steps: int | None = None,
        ref_sync_alpha: float = 1.0,
        reference_cache_dir: str | None = None,
        tokenizer: str | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        on_nonfinite: Literal["error", "skip"] = "error",
        init_seed: int = 0,
        chunk_size: int | None = None,
        response_only_head: bool = True,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        generation: GenerationOptions | None = None,
    ) -> None:
        super().__init__()
        # The factories are kept by the CLI's config.yaml; as hparams they would be pickled objects. The loss is
        # kept as its spec (class_path and init_args), so load_from_checkpoint rebuilds the loss that was trained.
        self.save_hyperparameters(ignore=["loss", "optimizer", "scheduler", "generation"])
        if isinstance(generation, dict):  # as checkpoints keep it
            generation = GenerationOptions(**generation)
        self.generation = generation if generation is not None else GenerationOptions()
        self.hparams["generation"] = dataclasses.asdict(self.generation)
        if isinstance(loss, dict):  # a spec, as checkpoints keep it
            try:
                loss = loss_from_spec(loss)
            except UnknownLossError as err:
                raise UserInputError(f"model.loss: {err}") from None
        self.loss = loss if loss is not None else DPOLoss()
        self.hparams["loss"] = self.loss.spec
        check_reference_mode(reference_mode, self.loss, ref_sync_steps)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        if tokenizer is None and not isinstance(policy, str):
            raise UserInputError("model.tokenizer: required when model.policy is a config dict (e.g. 'byte')")
        own = tokenizer is None  # the policy's own tokenizer comes from the same revision as the policy
        self.tokenizer = load_tokenizer(policy if own else tokenizer, model_kwargs=model_kwargs if own else None)
        self.policy: SequenceScorer | None = None
        self.reference: SequenceScorer | None = None
        self.train_metrics, self.val_metrics, self.test_metrics = (PreferenceMetrics() for _ in range(3))

    @property
    def requires_kl_baseline(self) -> bool:
        """Whether batches must carry mismatched pairs for KTO's KL baseline (linked to the data module)."""
        return self.loss.requires_kl_baseline

    @property
    def uses_reference_model(self) -> bool:
        """A reference model is built: in ``model`` mode for a loss that needs one, and for ``predict`` in
        ``precomputed`` mode too (its completions are written next to the policy's)."""
        if not self.loss.requires_reference:
            return False
        predicting = self._trainer is not None and self.trainer.predicting
        return self.hparams.reference_mode == "model" or (predicting and self.hparams.reference_mode == "precomputed")

    @property
    def reference_torch_dtype(self) -> torch.dtype | None:
        """``reference_dtype`` as a ``torch.dtype`` (``None``: the policy's)."""
        return getattr(torch, self.hparams.reference_dtype) if self.hparams.reference_dtype else None

    def scorer(self, model: torch.nn.Module) -> SequenceScorer:
        """Wrap ``model`` in a :class:`SequenceScorer` with this module's log-prob settings."""
        return SequenceScorer(model, self.hparams.chunk_size, self.hparams.response_only_head)

    @property
    def parameter_dtype(self) -> torch.dtype:
        """The policy's parameter dtype: ``model.dtype``, else from the trainer's precision (fp32 without one)."""
        precision = self._trainer.precision if self._trainer is not None else None
        return parameter_dtype(precision, self.hparams.dtype)

    def load_model(
        self, spec: ModelSpec, field: str, dtype: torch.dtype | None = None, model_kwargs: dict[str, Any] | None = None
    ) -> torch.nn.Module:
        """Load ``spec`` as this module loads its policy (same seed and tokenizer-derived config fields)."""
        fields = {"vocab_size": len(self.tokenizer), "pad_token_id": self.tokenizer.pad_token_id}
        return load_causal_lm(
            spec, field=field, seed=self.hparams.init_seed, dtype=dtype or self.parameter_dtype,
            model_kwargs=model_kwargs, **fields,
        )

    @property
    def reference_model_kwargs(self) -> dict[str, Any] | None:
        hp = self.hparams
        return hp.reference_model_kwargs if hp.reference_model_kwargs is not None else hp.model_kwargs

    def configure_model(self) -> None:
        """Build the models here, not in ``__init__``, so sharded strategies can materialize them per rank."""
        if self.policy is not None:  # called again by load_from_checkpoint and by each trainer entry point
            return
        hp = self.hparams
        policy = self.load_model(hp.policy, "model.policy", model_kwargs=hp.model_kwargs)
        if hp.disable_dropout:
            disable_dropout(policy)
        if hp.gradient_checkpointing:
            enable_activation_checkpointing(policy)
        if hp.reference_mode == "adapter":
            policy = apply_lora(policy, hp.lora)
        self.policy = self.scorer(policy)
        if hp.compile:
            self.policy.compile()
        if self.uses_reference_model:
            self.reference = self.build_reference_scorer(copy_of=policy)
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 over its device mesh
            apply_fsdp2([s for s in (self.policy, self.reference) if s is not None], fsdp_mesh(self.device_mesh))
        if self._trainer is not None:
            rank_zero_info(self._describe_dtypes())

    def build_reference_scorer(self, copy_of: torch.nn.Module | None = None) -> SequenceScorer:
        """The frozen reference, in eval mode: a copy of ``copy_of`` (the freshly loaded policy) or loaded from
        ``model.reference`` (default: the policy's spec, with its seed, dropout off as the policy has it)."""
        hp = self.hparams
        dtype = self.reference_torch_dtype
        if hp.reference is None and copy_of is not None:
            reference = copy.deepcopy(copy_of).to(dtype) if dtype else copy.deepcopy(copy_of)
        else:
            spec, kwargs = (hp.policy, hp.model_kwargs) if hp.reference is None else (hp.reference, self.reference_model_kwargs)
            reference = self.load_model(spec, "model.reference", dtype, kwargs)
            if hp.disable_dropout:
                disable_dropout(reference)
        return self.scorer(reference.to(self.device)).requires_grad_(False).eval()

    def reference_identity(self) -> dict[str, Any]:
        """What the reference's log-probs depend on (the key of precomputed tables): its weights by content,
        the dtype it is built in, its loading arguments and the log-prob settings."""
        hp = self.hparams
        spec, kwargs = (hp.policy, hp.model_kwargs) if hp.reference is None else (hp.reference, self.reference_model_kwargs)
        return {
            "weights": weights_fingerprint(spec, kwargs, hp.init_seed),
            "dtype": str(self.reference_torch_dtype or self.parameter_dtype),
            "model_kwargs": kwargs, "response_only_head": hp.response_only_head,
        }

    def configure_callbacks(self) -> list:
        """``reference_mode: precomputed``: the callback that computes, caches and hands out reference log-probs."""
        if self.hparams.reference_mode == "precomputed" and self.loss.requires_reference:
            return [PrecomputedReference(self.hparams.reference_cache_dir)]
        return []

    def _describe_dtypes(self) -> str:
        """One line: the policy's parameter dtype and why, and the reference's."""
        hp = self.hparams
        policy_dtype = str(next(self.policy.parameters()).dtype).removeprefix("torch.")
        why = "model.dtype" if hp.dtype else f"trainer.precision {self._trainer.precision}"
        line = f"lightning-pref: policy parameters {policy_dtype} ({why}; checkpoint {storage_dtype(hp.policy, hp.model_kwargs)})"
        if self.reference is not None:
            reference_dtype = str(next(self.reference.parameters()).dtype).removeprefix("torch.")
            line += f", reference {reference_dtype}" + (" (model.reference_dtype)" if hp.reference_dtype else "")
        return line

    def train(self, mode: bool = True) -> PreferenceModule:
        """Switch modes, but keep the reference in eval mode (no dropout) even after validation."""
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    def configure_optimizers(self) -> Any:
        # The factories run only now: an argument they refuse (a negative lr, say) is one line naming the option.
        try:
            optimizer = self.optimizer_factory([p for p in self.policy.parameters() if p.requires_grad])
        except ValueError as err:
            raise UserInputError(f"model.optimizer: {err}") from None
        if self.scheduler_factory is None:
            return optimizer
        try:
            scheduler = self.scheduler_factory(optimizer)
        except ValueError as err:
            raise UserInputError(f"model.scheduler: {err}") from None
        if hasattr(scheduler, "set_total_steps"):  # e.g. WarmupDecay: schedules that span the whole run
            scheduler.set_total_steps(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def reference_scores(self, batch: PreferenceBatch, kl_rows: KLRows | None = None) -> tuple[Tensor, Tensor | None]:
        """Reference log-probs of the batch (and of ``kl_rows``) from the reference model, or from the policy
        with its adapters disabled."""
        adapter = self.hparams.reference_mode == "adapter"
        scorer = self.policy if adapter else self.reference
        with torch.no_grad(), self.policy.model.disable_adapter() if adapter else contextlib.nullcontext():
            logps, _, kl_logps = scorer(batch.input_ids, batch.attention_mask, batch.response_mask, kl_rows)
        return logps, kl_logps

    def forward(self, batch: PreferenceBatch) -> tuple[SequenceLogps, SequenceLogps | None, Tensor | None]:
        """Policy and reference log-probs of a batch (one concatenated forward of chosen and rejected rows), and
        KTO's KL baseline ``z0`` when the loss needs one (``None`` otherwise)."""
        kl_rows = self.kl_rows(batch)
        logps, tokens, policy_kl = self.policy(batch.input_ids, batch.attention_mask, batch.response_mask, kl_rows)
        policy = SequenceLogps.split(logps, tokens, batch.num_chosen)  # (N,) -> (B,), (B,)
        if not self.loss.requires_reference:
            return policy, None, None
        if self.hparams.reference_mode == "precomputed":  # never with a KL baseline (check_reference_mode)
            if batch.reference_logps is None:
                raise TrainingError("reference_mode 'precomputed' but the batch carries no reference log-probs")
            return policy, SequenceLogps.split(batch.reference_logps.to(logps.dtype), tokens, batch.num_chosen), None
        ref_logps, reference_kl = self.reference_scores(batch, kl_rows)
        strategy = self.trainer.strategy if self._trainer is not None else None
        kl = kl_baseline(policy_kl - reference_kl, strategy) if kl_rows is not None else None
        return policy, SequenceLogps.split(ref_logps, tokens, batch.num_chosen), kl

    def kl_rows(self, batch: PreferenceBatch) -> KLRows | None:
        """The batch's mismatched rows when the loss needs a KL baseline, else ``None``."""
        if not self.loss.requires_kl_baseline:
            return None
        if batch.kl_rows is None:
            raise UserInputError(
                f"{type(self.loss).__name__} needs a KL baseline but the batch has no mismatched pairs; "
                "set data.kl_baseline: true (the CLI links it automatically)"
            )
        return batch.kl_rows

    def _step(self, batch: PreferenceBatch, stage: str) -> tuple[Tensor, SequenceLogps]:
        if self.loss.paired and not batch.paired:
            raise UserInputError(
                f"model.loss: {type(self.loss).__name__} needs paired data (prompt/chosen/rejected) but the "
                f"{stage} batch is unpaired; use paired data or an unpaired loss such as kto"
            )
        policy, reference, kl = self(batch)
        out = self.loss(policy, reference, kl_baseline=kl)
        loss = out.losses.mean()
        values = per_example(out, policy, batch.paired, batch.weights)
        batch_size = batch.num_chosen if batch.paired else batch.input_ids.shape[0]
        if stage == "train":  # per step: this batch's values, logged as plain tensors in one call
            logged = {f"train/{k}": v for k, v in (batch_means(values) | out.metrics).items()}
            for prog_bar in (True, False):
                part = {k: v for k, v in logged.items() if (k in _PROGRESS_BAR) is prog_bar}
                self.log_dict(part, prog_bar=prog_bar, on_step=True, on_epoch=False, batch_size=batch_size)
        else:  # per epoch: exact means over every example on every device
            for key, metric in getattr(self, f"{stage}_metrics").update(values).items():
                self.log(f"{stage}/{key}", metric, on_step=False, on_epoch=True, batch_size=batch_size)
            for key, value in out.metrics.items():
                self.log(f"{stage}/{key}", value, on_step=False, on_epoch=True, batch_size=batch_size, sync_dist=True)
        return loss, policy

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor:
        loss, policy = self._step(batch, "train")
        # Decided jointly so that under DDP either every rank skips the batch or none does.
        nonfinite = self.trainer.strategy.reduce_boolean_decision(not torch.isfinite(loss).item(), all=False)
        if not nonfinite:
            self._finite_batches += 1
            return loss
        where = f"step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})"
        if self.hparams.on_nonfinite == "error":
            raise TrainingError(
                f"non-finite loss ({loss.item()}) at {where}; lower the learning rate or check that batch's data, "
                "or set model.on_nonfinite: skip to skip such batches"
            )
        warnings.warn(f"non-finite loss at {where}: batch skipped (model.on_nonfinite: skip)", stacklevel=2)
        # A zero-weighted loss rather than None (which Lightning refuses on several devices): every device still
        # runs its backward and its collectives, and this batch adds nothing to the gradients.
        return torch.cat([policy.chosen, policy.rejected]).nan_to_num(0.0, 0.0, 0.0).sum() * 0.0

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # A step whose every batch was skipped, or whose gradients are not finite after all (a non-finite
        # activation leaks through even a zero weight), is not taken: without gradients, optimizers skip the
        # parameters (no momentum or weight-decay update either). Decided jointly, like the skip itself.
        skipped = self._finite_batches == 0
        if not skipped and self.hparams.on_nonfinite == "skip":
            local = any(p.grad is not None and not torch.isfinite(p.grad).all() for p in self.policy.parameters())
            skipped = self.trainer.strategy.reduce_boolean_decision(local, all=False)
        if skipped:
            optimizer.zero_grad(set_to_none=True)
        self._finite_batches = 0

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then TR-DPO's reference update: once per optimizer step (not per accumulated
        batch), before the step's checkpoint is written, so a resumed run moves the reference exactly as an
        uninterrupted one."""
        super().optimizer_step(*args, **kwargs)
        steps, step = self.hparams.ref_sync_steps, self.global_step + 1  # global_step counts it once this returns
        if steps and step % steps == 0:
            soft_update(self.reference, self.policy, self.hparams.ref_sync_alpha)

    def on_fit_start(self) -> None:
        # from_pretrained returns eval mode and Lightning keeps each module's mode: without this a loaded policy
        # would train in eval mode (gradient checkpointing and dropout silently off). The reference stays eval.
        self.train()
        self._finite_batches = 0

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end a completion: the policy's EOS ids and the chat template's end-of-turn."""
        if getattr(self, "_stop_ids", None) is None:
            end_of_turn = ChatTemplate(self.tokenizer).end_of_turn if getattr(self.tokenizer, "chat_template", None) else ""
            self._stop_ids = stop_token_ids(self.policy.lm, self.tokenizer, end_of_turn)
        return self._stop_ids

    def complete(
        self, prompts: list[list[int]], seed: int | None = None, with_reference: bool = True
    ) -> tuple[Completions, Completions | None]:
        """Completions of prompt ids by the policy and, where there is one, the reference (the same seed).

        Args:
            prompts: prompt token ids.
            seed: seed of the sampling; ``None`` = ``model.generation.seed``.
            with_reference: also the reference's (``None`` without a reference model).
        """
        ids, mask = left_pad(prompts, self.tokenizer.pad_token_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        seed = self.generation.seed if seed is None else seed
        run = partial(generate, input_ids=ids, attention_mask=mask, options=self.generation, tokenizer=self.tokenizer,
                      seed=seed, stop_ids=self.stop_ids)
        policy = run(self.policy.lm)
        if not with_reference:
            return policy, None
        if self.hparams.reference_mode == "adapter":
            with self.policy.model.disable_adapter():
                return policy, run(self.policy.lm)
        return policy, run(self.reference.lm) if self.reference is not None else None

    def predict_step(self, batch: PromptBatch, batch_idx: int) -> dict[str, Any]:
        """Completions of a batch of prompts as records for :class:`~lightning_pref.predict.PredictionWriter`;
        each batch is seeded by ``model.generation.seed`` plus its first prompt's index."""
        seed = self.generation.seed + int(batch.index[0])
        prompts = [row[mask.bool()].tolist() for row, mask in zip(batch.input_ids, batch.attention_mask, strict=True)]
        policy, reference = self.complete(prompts, seed)
        records = []
        for i, prompt in enumerate(batch.prompts):
            record = {"prompt": prompt, **_completions("policy", policy, i)}
            record |= _completions("reference", reference, i) if reference is not None else {"reference": None}
            records.append(record)
        return {"index": batch.index.tolist(), "weights": batch.weights.tolist(), "records": records}

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        self._step(batch, "test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave a frozen reference out (it is rebuilt from the config) and keep the RNG states for resume."""
        if not self.hparams.ref_sync_steps:  # a synced reference has moved and must be saved
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith(_REFERENCE_PREFIX)]:
                del state[key]
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()

    @property
    def strict_loading(self) -> bool:
        """Whether Lightning's own loading is strict: not under FSDP2, which loads parameter by parameter and
        would refuse the frozen reference's keys (left out of checkpoints on purpose); there
        :meth:`on_load_checkpoint` checks the keys instead. Elsewhere :meth:`load_state_dict` checks them."""
        if self._strict_loading is not None:
            return self._strict_loading
        return self.device_mesh is None

    @strict_loading.setter
    def strict_loading(self, value: bool) -> None:
        self._strict_loading = value

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load weights, allowing exactly the frozen reference's keys to be missing (checkpoints leave it out; it
        is rebuilt from the config) and nothing else, whatever ``strict`` a caller asks for.

        Raises:
            UserInputError: a key of the policy (or a moved reference) is missing, a key is unexpected, or a
                shape does not fit: the checkpoint belongs to another model.
        """
        try:
            result = super().load_state_dict(state_dict, strict=False, assign=assign)
        except RuntimeError as err:  # size mismatches are raised even when not strict
            detail = " ".join(str(err).split("\n\t")[1:2]).strip() or str(err).splitlines()[0]
            raise UserInputError(f"--ckpt_path: the checkpoint does not fit this model ({detail}); {_OTHER_MODEL}") from None
        self._check_keys(result.missing_keys, result.unexpected_keys)
        return result

    def _check_keys(self, missing: list[str], unexpected: list[str]) -> None:
        frozen = self.reference is not None and not self.hparams.ref_sync_steps
        missing = [k for k in missing if not (frozen and k.startswith(_REFERENCE_PREFIX))]
        if missing or unexpected:
            what = f"missing {_few(missing)}" if missing else f"unexpected {_few(unexpected)}"
            raise UserInputError(f"--ckpt_path: the checkpoint does not fit this model ({what}); {_OTHER_MODEL}")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint trained with another loss, or (where the strategy loaded the weights itself,
        non-strictly) one whose keys do not fit; restore the RNG states when resuming."""
        trained = checkpoint.get("hyper_parameters", {}).get("loss")
        if self._trainer is not None and isinstance(trained, dict) and trained != self.loss.spec:
            raise UserInputError(
                f"--ckpt_path: the checkpoint was trained with {_describe(trained)} but model.loss is "
                f"{_describe(self.loss.spec)}; give the loss it was trained with (its run's config.yaml has it), or "
                "export the policy and start a new run from the exported model"
            )
        path = self._trainer.ckpt_path if self._trainer is not None else None
        if "state_dict" not in checkpoint and path is not None and Path(path).is_file():
            saved = torch.load(path, map_location="cpu", mmap=True, weights_only=False)["state_dict"].keys()
            expected = self.state_dict().keys()
            self._check_keys([k for k in expected if k not in saved], [k for k in saved if k not in expected])
        rng = checkpoint.get("rng_states")
        if rng is not None and self._trainer is not None:  # resuming a run, not loading weights for inference
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])


def _completions(name: str, completions: Completions, i: int) -> dict[str, Any]:
    """Prompt ``i``'s completions as record fields: text(s), tokens, whether each ended with a stop token."""
    k = len(completions.texts[i])
    rows = slice(i * k, (i + 1) * k)
    texts, tokens, eos = completions.texts[i], completions.lengths[rows].tolist(), completions.eos[rows].tolist()
    if k == 1:
        return {name: texts[0], f"{name}_tokens": tokens[0], f"{name}_eos": eos[0]}
    return {name: texts, f"{name}_tokens": tokens, f"{name}_eos": eos}


_OTHER_MODEL = "it was written for another model: use the model.policy and model options it was trained with"


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def _describe(spec: dict[str, Any]) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in (spec.get("init_args") or {}).items())
    return f"{spec['class_path'].rsplit('.', 1)[-1]}({args})"
