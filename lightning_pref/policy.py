"""``PolicyModule``: what every module that trains a causal-LM policy shares: the policy and its reference, their
batches' layout, sampling completions (``predict``, ``evaluate``, on-policy methods).

Its subclasses add an objective: ``PreferenceModule`` (a preference loss on pairs), ``OnPolicyModule`` (pairs the
policy writes), ``PolicyGradientModule`` (reinforcement learning from a reward).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info

from lightning_pref import layout
from lightning_pref.base_module import BaseModule
from lightning_pref.checks import check_choice, check_range, refuse_unused
from lightning_pref.data.chat import ChatTemplate
from lightning_pref.generation import Completions, GenerationOptions, Sampler, stop_token_ids
from lightning_pref.logps import SequenceScorer
from lightning_pref.models import CheckpointMethod, DtypeName, ModelSpec
from lightning_pref.predict import prediction_records
from lightning_pref.reference import (
    AdapterReference,
    ModelReference,
    NoReference,
    Reference,
    ReferenceMode,
    ReferenceOptions,
    build_reference,
)
from lightning_pref.sharding import apply_fsdp2, fsdp_mesh
from lightning_pref.types import PreferenceBatch, PromptBatch


class PolicyModule(BaseModule):
    """A causal-LM policy and its reference (see the module docstring); subclasses add what it is trained on.

    Args:
        policy: the model to train: a Hugging Face hub id or local directory (``AutoModelForCausalLM``), or a
            dict of ``transformers`` config fields for a randomly initialized model.
        reference: the reference model; ``None`` = the policy's initial weights.
        reference_mode: ``model`` (a frozen reference model), ``precomputed`` (log-probs computed once before
            training and cached; no reference in memory), ``none`` (no reference is needed) or ``adapter``
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
        gradient_checkpointing: recompute the policy's decoder-layer activations in backward instead of keeping
            them (less memory, more time); ``true``: every layer's, an integer ``n``: every n-th layer's or
            the bottom n (``gradient_checkpointing_method``), the others keeping theirs (memory the recompute
            would free is traded back for time). Never the top layer's: its checkpoint frees memory only until
            backward starts (:func:`~lightning_pref.models.enable_activation_checkpointing`).
        gradient_checkpointing_method: which layers an integer ``n`` recomputes: ``uniform``, every n-th from
            the first; ``block``, the bottom n (Megatron-LM's methods). ``block`` keeps the top layers'
            activations, which backward frees first, while the gradients it allocates grow: the recompute
            memory did not need goes where the step's peak, at the end of backward, leaves room.
        compile: ``torch.compile`` the policy's forward (in place, so checkpoint keys do not change).
        generation: how completions are sampled (``predict``, ``evaluate``, ``SampleCompletions``).
    """

    not_hparams = (*BaseModule.not_hparams, "generation")

    def __init__(
        self,
        policy: ModelSpec,
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
        gradient_checkpointing: bool | int = False,
        gradient_checkpointing_method: CheckpointMethod = "uniform",
        compile: bool = False,
        generation: GenerationOptions | None = None,
    ) -> None:
        super().__init__(policy, tokenizer, model_kwargs, optimizer, scheduler)
        if isinstance(generation, dict):  # as checkpoints keep it
            generation = GenerationOptions(**generation)
        self.generation = generation if generation is not None else GenerationOptions()
        self.hparams["generation"] = dataclasses.asdict(self.generation)
        self._check_options()
        self.policy: SequenceScorer | None = None
        self.reference: Reference = NoReference()
        self._sampler: Sampler | None = None

    @property
    def needs_reference(self) -> bool:
        """Whether the objective reads reference log-probs (a subclass says; ``reference_mode`` says how)."""
        return True

    def _check_options(self) -> None:
        """Refuse options outside their range, and options that the other options leave unread (each would be
        silently ignored: ``lora`` without adapter mode trained the whole model), naming the option and the fix."""
        hp = self.hparams
        mode = hp.reference_mode
        check_choice("model.reference_mode", mode, get_args(ReferenceMode))
        check_range("model.chunk_size", hp.chunk_size, 1, integer=True,
                    hint="null picks one from the vocabulary size")
        check_range("model.ref_sync_alpha", hp.ref_sync_alpha, 0, 1, low_open=True,
                    hint="ref <- (1 - alpha) ref + alpha policy; 1.0 copies the policy")
        if hp.lora is not None and mode != "adapter":
            refuse_unused("model.lora", hp.lora, f"LoRA adapters are trained only with reference_mode adapter (got "
                          f"{mode!r}, which trains every weight); set model.reference_mode: adapter, or drop model.lora")
        if hp.ref_sync_alpha != 1.0 and hp.ref_sync_steps is None:
            refuse_unused("model.ref_sync_alpha", hp.ref_sync_alpha, "the reference is moved towards the policy only "
                          "every model.ref_sync_steps steps (TR-DPO); set ref_sync_steps, or drop ref_sync_alpha")
        if hp.reference_cache_dir is not None and mode != "precomputed":
            refuse_unused("model.reference_cache_dir", hp.reference_cache_dir, f"only reference_mode precomputed "
                          f"caches reference log-probs (got {mode!r}); drop it or use reference_mode precomputed")
        if mode in ("none", "adapter"):
            what = "there is no reference" if mode == "none" else "the reference is the policy with its adapters off"
            for name in ("reference", "reference_dtype", "reference_model_kwargs"):
                if hp[name] is not None:
                    refuse_unused(f"model.{name}", hp[name], f"with reference_mode {mode} {what}; drop model.{name}")

    def check_reference_used(self, needed_by: str) -> None:
        """Once the objective is known: refuse reference options when it reads no reference (the reference is
        then not built, so they would be ignored).

        Args:
            needed_by: what would need the reference, in the message (the loss's class name).
        """
        if self.needs_reference or self.hparams.reference_mode == "adapter":
            return
        for name in ("reference", "reference_dtype", "reference_model_kwargs", "ref_sync_steps", "reference_cache_dir"):
            if self.hparams[name] is not None:
                refuse_unused(f"model.{name}", self.hparams[name], f"{needed_by} uses no reference model, so none is "
                              f"built; drop model.{name}")

    # ------------------------------------------------------------------------------------------------- models
    def scorer(self, model: torch.nn.Module) -> SequenceScorer:
        """Wrap ``model`` in a :class:`SequenceScorer` with this module's log-prob settings."""
        return SequenceScorer(model, self.hparams.chunk_size, self.hparams.response_only_head)

    def configure_model(self) -> None:
        """Build the models here, not in ``__init__``, so sharded strategies can materialize them per rank."""
        if self.policy is not None:  # called again by load_from_checkpoint and by each trainer entry point
            return
        hp = self.hparams
        policy = self.load_trained_model(hp.policy, hp.model_kwargs)
        if hp.reference_mode == "adapter":
            policy = AdapterReference.wrap(policy, hp.lora)
        self.policy = self.scorer(policy)
        if hp.compile:
            self.policy.compile()
        self.reference = build_reference(
            ReferenceOptions.from_hparams(hp), policy,
            lambda spec, kwargs, dtype: self.load_model(spec, "model.reference", dtype, kwargs),
            parameter_dtype=self.parameter_dtype, pad_token_id=self.tokenizer.pad_token_id,
            needed=self.needs_reference, predicting=self._trainer is not None and self.trainer.predicting,
        )
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 over its device mesh
            apply_fsdp2([s for s in (self.policy, self.reference) if isinstance(s, SequenceScorer)],
                        fsdp_mesh(self.device_mesh))
        if self._trainer is not None:
            rank_zero_info(self._describe_dtypes())

    def _describe_dtypes(self) -> str:
        """One line: the policy's parameter dtype and why, and the reference's."""
        line = self.describe_dtype("policy", self.policy)
        if isinstance(self.reference, ModelReference):
            dtype = str(next(self.reference.parameters()).dtype).removeprefix("torch.")
            line += f", reference {dtype}" + (" (model.reference_dtype)" if self.hparams.reference_dtype else "")
        return line

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    @property
    def sharded(self) -> bool:
        """Whether the models are sharded over processes (FSDP, FSDP2): every rank must run every forward."""
        return self.device_mesh is not None or (self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy))

    # ------------------------------------------------------------------------------------------- stage hooks
    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.reference.prepare(self.trainer)

    def on_validation_start(self) -> None:
        self.reference.prepare(self.trainer)

    def on_test_start(self) -> None:
        self.reference.prepare(self.trainer)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """On the CPU, before the batch moves: lay it out as the models can run it (decided once per model, see
        :meth:`BaseModule.runnable_layout`), and attach what the reference gives ahead (precomputed log-probs)."""
        batch = super().on_before_batch_transfer(batch, dataloader_idx)
        if isinstance(batch, PreferenceBatch):
            self.reference.attach(batch)
        return batch

    def sequence_batch(self, sequences: list[layout.Sequence], packing: bool | str) -> PreferenceBatch:
        """``N`` sequences (e.g. a rollout's prompts and completions) as one unpaired batch on the device, packed
        when ``packing`` asks for it and the models run it, else padded. Packed with shared prompts (``auto``,
        ``shared``), sequences with the same prompt (a prompt's ``k`` samples) share one segment: the prompt runs
        once, each completion attends to it and to itself only."""
        pad_id = self.tokenizer.pad_token_id
        if packing:
            owners = layout.same_prompt_owners(sequences) if packing in ("shared", "auto") else None
            batch = PreferenceBatch(None, None, None, num_chosen=len(sequences), paired=False,
                                    packed=layout.pack(sequences, pad_id, prompt_owners=owners))
        else:
            batch = PreferenceBatch(*layout.pad(sequences, pad_id), num_chosen=len(sequences), paired=False)
        self.runnable_layout(batch)
        return self.transfer_batch_to_device(batch, self.device, 0)

    @property
    def layout_scorers(self) -> list[Any]:
        """The policy and, where it is a model, the reference: both run every batch."""
        return [s for s in (self.policy, self.reference) if isinstance(s, SequenceScorer)]

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then the reference's own step (TR-DPO's sync), once per optimizer step."""
        super().optimizer_step(*args, **kwargs)
        self.reference.after_optimizer_step(self.policy, self.global_step + 1)  # global_step counts it on return

    # -------------------------------------------------------------------------------------------- generation
    @property
    def sampler(self) -> Sampler:
        """Samples completions with ``model.generation``, stopping at the policy's EOS ids and the chat template's
        end-of-turn."""
        if self._sampler is None:
            end_of_turn = ChatTemplate(self.tokenizer).end_of_turn if getattr(self.tokenizer, "chat_template", None) else ""
            stops = stop_token_ids(self.policy.lm, self.tokenizer, end_of_turn)
            self._sampler = Sampler(self.tokenizer, self.generation, stops, synced=self.sharded)
        return self._sampler

    def complete(
        self, prompts: list[list[int]], seed: int | None = None, with_reference: bool = True
    ) -> tuple[Completions, Completions | None]:
        """Completions of prompt ids by the policy and, where there is one, the reference (the same seed).

        Args:
            prompts: prompt token ids.
            seed: seed of the sampling; ``None`` = ``model.generation.seed``.
            with_reference: also the reference's (``None`` without a reference model).
        """
        seed = self.generation.seed if seed is None else seed
        policy = self.sampler(self.policy.lm, prompts, seed)
        if not with_reference:
            return policy, None
        with self.reference.generator(self.policy) as model:
            return policy, self.sampler(model, prompts, seed) if model is not None else None

    def predict_step(self, batch: PromptBatch, batch_idx: int) -> dict[str, Any]:
        """Completions of a batch of prompts as records for :class:`~lightning_pref.predict.PredictionWriter`;
        each batch is seeded by ``model.generation.seed`` plus its first prompt's index."""
        seed = self.generation.seed + int(batch.index[0])
        prompts = batch.token_ids()
        policy, reference = self.complete(prompts, seed)
        return {"index": batch.index.tolist(), "weights": batch.weights.tolist(),
                "records": prediction_records(batch.prompts, policy, reference)}

    def may_be_missing(self, key: str) -> bool:
        """The reference's keys where it leaves itself out of checkpoints (a frozen model, rebuilt from the
        config)."""
        return key.startswith("reference.") and self.reference.may_be_missing(key.removeprefix("reference."))
