"""``PreferenceModule``: a trainable policy, a reference, and a loss plugin."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
import warnings
from functools import partial
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_pref.base_module import BaseModule
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
    storage_dtype,
)
from lightning_pref.precompute import PrecomputedReference, weights_fingerprint
from lightning_pref.reference import ReferenceMode, apply_lora, check_reference_mode, soft_update
from lightning_pref.registry import LOSSES
from lightning_pref.sharding import apply_fsdp2, fsdp_mesh
from lightning_pref.throughput import flop_parameters
from lightning_pref.types import KLRows, PreferenceBatch, PromptBatch, SequenceLogps

# The frozen reference is in eval mode on purpose; Lightning warns about any eval-mode module at fit start.
warnings.filterwarnings("ignore", message=re.escape("Found ") + r"\d+ module\(s\) in eval mode at the start of training")

_REFERENCE_PREFIX = "reference."
_PROGRESS_BAR = ("train/loss", "train/rewards/accuracies")


class PreferenceModule(BaseModule):
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

    loss_registry = LOSSES
    plugin_registries = {"loss": LOSSES}

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
        self.init_common(loss, DPOLoss, policy, "model.policy", tokenizer, model_kwargs, optimizer, scheduler)
        check_reference_mode(reference_mode, self.loss, ref_sync_steps)
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
        self.flop_params = flop_parameters(policy)
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

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def reference_scores(self, batch: PreferenceBatch, kl_rows: KLRows | None = None) -> tuple[Tensor, Tensor | None]:
        """Reference log-probs of the batch (and of ``kl_rows``) from the reference model, or from the policy
        with its adapters disabled."""
        adapter = self.hparams.reference_mode == "adapter"
        scorer = self.policy if adapter else self.reference
        with torch.no_grad(), self.policy.model.disable_adapter() if adapter else contextlib.nullcontext():
            logps, _, kl_logps = scorer(batch.input_ids, batch.attention_mask, batch.response_mask, kl_rows, batch.packed)
        return logps, kl_logps

    def forward(self, batch: PreferenceBatch) -> tuple[SequenceLogps, SequenceLogps | None, Tensor | None]:
        """Policy and reference log-probs of a batch (one concatenated forward of chosen and rejected rows), and
        KTO's KL baseline ``z0`` when the loss needs one (``None`` otherwise)."""
        kl_rows = self.kl_rows(batch)
        logps, tokens, policy_kl = self.policy(batch.input_ids, batch.attention_mask, batch.response_mask, kl_rows,
                                               batch.packed)
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
        batch_size = batch.num_chosen if batch.paired else batch.num_sequences
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
        reference_passes = int(self.loss.requires_reference and self.hparams.reference_mode in ("model", "adapter"))
        kl_tokens = int(batch.kl_rows.attention_mask.sum()) if batch.kl_rows is not None else 0
        self.log_batch_cost(batch, reference_passes, kl_tokens * (1 + reference_passes))
        return self.checked_loss(loss, torch.cat([policy.chosen, policy.rejected]), batch_idx)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then TR-DPO's reference update: once per optimizer step (not per accumulated
        batch), before the step's checkpoint is written, so a resumed run moves the reference exactly as an
        uninterrupted one."""
        super().optimizer_step(*args, **kwargs)
        steps, step = self.hparams.ref_sync_steps, self.global_step + 1  # global_step counts it once this returns
        if steps and step % steps == 0:
            soft_update(self.reference, self.policy, self.hparams.ref_sync_alpha)

    @property
    def sharded(self) -> bool:
        """Whether the models are sharded over processes (FSDP, FSDP2): every rank must run every forward."""
        from lightning.pytorch.strategies import FSDPStrategy

        return self.device_mesh is not None or (self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy))

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
                      seed=seed, stop_ids=self.stop_ids, synced=self.sharded)
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

    def may_be_missing(self, key: str) -> bool:
        """A frozen reference is left out of checkpoints (rebuilt from the config); a TR-DPO-synced one has
        moved and is saved."""
        return key.startswith(_REFERENCE_PREFIX) and self.reference is not None and not self.hparams.ref_sync_steps


def _completions(name: str, completions: Completions, i: int) -> dict[str, Any]:
    """Prompt ``i``'s completions as record fields: text(s), tokens, whether each ended with a stop token."""
    k = len(completions.texts[i])
    rows = slice(i * k, (i + 1) * k)
    texts, tokens, eos = completions.texts[i], completions.lengths[rows].tolist(), completions.eos[rows].tolist()
    if k == 1:
        return {name: texts[0], f"{name}_tokens": tokens[0], f"{name}_eos": eos[0]}
    return {name: texts, f"{name}_tokens": tokens, f"{name}_eos": eos}


