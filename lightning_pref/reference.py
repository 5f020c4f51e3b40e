"""Where reference log-probs come from (``model.reference_mode``), as one component with one class per mode.

- ``model`` (:class:`ModelReference`): a frozen reference model next to the policy (a copy of its initial weights,
  or another model), in eval mode, optionally moved towards the policy (TR-DPO).
- ``precomputed`` (:class:`PrecomputedReference`): log-probs computed once before training and cached on disk
  (:mod:`lightning_pref.precompute`); no reference model in memory while training.
- ``none`` (:class:`NoReference`): no reference at all, for losses with ``requires_reference = False``.
- ``adapter`` (:class:`AdapterReference`): the policy is a LoRA model (``peft``); the reference is the same model
  with its adapters disabled.

What a mode answers (:class:`Reference`): the reference log-probs of a batch (and of KTO's mismatched rows),
what it attaches to a batch before it moves to the device, what it must prepare before a stage runs, the
forward passes it costs (FLOPs), which checkpoint keys it leaves out, the model reference completions come from,
and what it does after an optimizer step. The module asks these questions and never looks at the mode's name.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch import Trainer
from torch import Tensor, nn

from lightning_pref.errors import TrainingError, UserInputError
from lightning_pref.logps import SequenceScorer, TokenLogps
from lightning_pref.models import ModelSpec
from lightning_pref.precompute import load_or_compute, weights_fingerprint
from lightning_pref.types import KLRows, PreferenceBatch

ReferenceMode = Literal["model", "precomputed", "none", "adapter"]


def check_reference_mode(mode: str, needed: bool, fresh_rows: bool, name: str, ref_sync_steps: int | None) -> None:
    """Refuse combinations that cannot work, with the field to change.

    Args:
        mode: ``model.reference_mode``.
        needed: the objective reads reference log-probs.
        fresh_rows: it scores rows made anew in every batch (KTO's mismatched pairs), which no table can hold.
        name: what needs the reference, in messages (the loss's class name).
        ref_sync_steps: TR-DPO's ``model.ref_sync_steps``.
    """
    if mode == "none" and needed:
        raise UserInputError(
            f"model.reference_mode: 'none' gives no reference log-probs, but {name} requires them; use "
            "reference_mode 'model', 'precomputed' or 'adapter', or a reference-free loss (simpo, orpo, nll)"
        )
    if mode == "precomputed" and fresh_rows:
        raise UserInputError(
            f"model.reference_mode: 'precomputed' cannot serve {name}: its KL baseline pairs are drawn anew in every "
            "batch, so their reference log-probs cannot be computed ahead; use reference_mode 'model'"
        )
    if ref_sync_steps is not None and mode != "model":
        raise UserInputError(
            f"model.ref_sync_steps: syncing the reference with the policy needs reference_mode 'model', got {mode!r}"
        )
    if ref_sync_steps is not None and ref_sync_steps < 1:
        raise UserInputError(f"model.ref_sync_steps: must be >= 1 (or null to disable), got {ref_sync_steps}")


class Reference(nn.Module):
    """The reference of a policy, whatever it is made of (see the module docstring).

    An ``nn.Module`` so that a mode holding a model has it moved, sharded and (where it must be) checkpointed
    with the module; modes without a model hold no parameters.

    Attributes:
        passes: forward passes without gradient this mode runs per training batch (for the FLOP count).
    """

    passes: ClassVar[int] = 0

    def logps(self, policy: SequenceScorer, batch: PreferenceBatch,
              kl_rows: KLRows | None = None) -> tuple[Tensor, Tensor | None]:
        """Reference log-probs of the batch's rows and of ``kl_rows`` (``None`` without them). # -> (N,), (M,)"""
        raise TrainingError(f"{type(self).__name__} gives no reference log-probs")

    def per_token(self, policy: SequenceScorer, batch: PreferenceBatch, temperature: float = 1.0) -> TokenLogps | None:
        """Reference log-probs of each response token at ``temperature`` (``None``: this mode has no model to
        score new rows with)."""
        return None

    def attach(self, batch: PreferenceBatch) -> None:
        """Attach what the batch needs from this reference before it moves to the device (default: nothing)."""

    def prepare(self, trainer: Trainer) -> None:
        """Get ready for the stage ``trainer`` is about to run (default: nothing to do)."""

    @contextlib.contextmanager
    def generator(self, policy: SequenceScorer) -> Iterator[nn.Module | None]:
        """The model reference completions are sampled from, while the context is open; ``None``: no such model."""
        yield None

    def may_be_missing(self, key: str) -> bool:
        """Whether a checkpoint may lack this key of the reference (relative to the reference)."""
        return False

    def after_optimizer_step(self, policy: SequenceScorer, step: int) -> None:
        """Called after every optimizer step with the number of steps taken (default: nothing)."""


class NoReference(Reference):
    """``none``, or any mode under a loss that needs no reference: no model, no log-probs."""


class ModelReference(Reference, SequenceScorer):
    """``model``: a frozen copy of a model, scored like the policy, always in eval mode, never trained.

    Args:
        model: the reference model (a copy of the policy's initial weights, or another model).
        chunk_size: as the policy's scorer.
        response_only_head: as the policy's scorer.
        sync_steps: TR-DPO (Gorbatovski et al. 2024): every this many optimizer steps, move the reference
            towards the policy; ``None``: never (the reference is then left out of checkpoints).
        sync_alpha: TR-DPO's mixing weight: ref <- (1 - alpha) ref + alpha policy (1.0 = hard copy).
    """

    passes = 1

    def __init__(self, model: nn.Module, chunk_size: int | None = None, response_only_head: bool = True,
                 sync_steps: int | None = None, sync_alpha: float = 1.0) -> None:
        super().__init__(model, chunk_size, response_only_head)
        self.sync_steps, self.sync_alpha = sync_steps, sync_alpha
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> ModelReference:
        """Stay in eval mode (no dropout) whatever the module around it switches to."""
        return super().train(False)

    @torch.no_grad()
    def logps(self, policy: SequenceScorer, batch: PreferenceBatch,
              kl_rows: KLRows | None = None) -> tuple[Tensor, Tensor | None]:
        logps, _, kl_logps = self(batch.input_ids, batch.attention_mask, batch.response_mask, kl_rows, batch.packed)
        return logps, kl_logps

    @torch.no_grad()
    def per_token(self, policy: SequenceScorer, batch: PreferenceBatch, temperature: float = 1.0) -> TokenLogps | None:
        return self.token_logps(batch, temperature)

    @contextlib.contextmanager
    def generator(self, policy: SequenceScorer) -> Iterator[nn.Module | None]:
        yield self.lm

    def may_be_missing(self, key: str) -> bool:
        """A frozen reference is rebuilt from the config; a TR-DPO-synced one has moved and is saved."""
        return not self.sync_steps

    @torch.no_grad()
    def after_optimizer_step(self, policy: SequenceScorer, step: int) -> None:
        """TR-DPO's soft update ``ref <- (1 - alpha) * ref + alpha * policy``, every ``sync_steps`` steps: once
        per optimizer step (not per accumulated batch), before that step's checkpoint is written, so a resumed run
        moves the reference exactly as an uninterrupted one."""
        if self.sync_steps and step % self.sync_steps == 0:
            for ref_param, param in zip(self.parameters(), policy.parameters(), strict=True):
                ref_param.lerp_(param.to(ref_param.dtype), self.sync_alpha)


class AdapterReference(Reference):
    """``adapter``: the policy is a LoRA model; the reference is the same model with its adapters disabled (no
    second copy of the weights)."""

    passes = 1

    @staticmethod
    def wrap(model: nn.Module, lora: dict[str, Any] | None) -> nn.Module:
        """``model`` with LoRA adapters (``peft.LoraConfig(**lora)``; default r=8, alpha=16, all linear
        layers); only the adapters are trainable."""
        try:
            from peft import LoraConfig, get_peft_model  # an optional extra: imported only in adapter mode
        except ImportError:
            raise UserInputError("model.reference_mode: 'adapter' needs peft: pip install 'lightning-pref[peft]'") from None
        config = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear", **(lora or {})}
        try:
            return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **config))
        except (TypeError, ValueError) as err:  # an unknown option (alpha for lora_alpha), r 0, no such module
            why = str(err).strip().splitlines()[0]
            raise UserInputError(f"model.lora: {why}; its keys are peft.LoraConfig's (r, lora_alpha, lora_dropout, "
                                 "target_modules, ...), and target_modules names the model's own modules") from None

    @torch.no_grad()
    def logps(self, policy: SequenceScorer, batch: PreferenceBatch,
              kl_rows: KLRows | None = None) -> tuple[Tensor, Tensor | None]:
        with policy.model.disable_adapter():
            logps, _, kl_logps = policy(batch.input_ids, batch.attention_mask, batch.response_mask, kl_rows,
                                        batch.packed)
        return logps, kl_logps

    @torch.no_grad()
    def per_token(self, policy: SequenceScorer, batch: PreferenceBatch, temperature: float = 1.0) -> TokenLogps | None:
        with policy.model.disable_adapter():
            return policy.token_logps(batch, temperature)

    @contextlib.contextmanager
    def generator(self, policy: SequenceScorer) -> Iterator[nn.Module | None]:
        with policy.model.disable_adapter():
            yield policy.lm


class PrecomputedReference(Reference):
    """``precomputed``: reference log-probs of every split, computed once (or read from the cache) before a stage
    runs, and attached to each batch by example index and response column. No reference model in memory.

    Args:
        identity: what the reference's log-probs depend on (its weights by content, dtype, loading arguments and
            log-prob settings): the cache key, with the data and the trainer's precision.
        build: builds the reference scorer, on a cache miss only (released once the table is computed).
        pad_token_id: the tokenizer's pad id.
        cache_dir: where tables are cached; ``None`` = ``~/.cache/lightning_pref/reference_logps``.
    """

    def __init__(self, identity: Callable[[], dict[str, Any]], build: Callable[[], SequenceScorer],
                 pad_token_id: int, cache_dir: str | None = None) -> None:
        super().__init__()
        self.identity, self.build, self.pad_token_id, self.cache_dir = identity, build, pad_token_id, cache_dir
        self.tables: dict[str, Tensor] = {}  # split -> (n, 2): column 0 chosen/desirable, 1 rejected

    def prepare(self, trainer: Trainer) -> None:
        """Load or compute the table of every split the data module holds."""
        datasets_ = getattr(trainer.datamodule, "datasets", None)
        if datasets_ is None:
            raise UserInputError("model.reference_mode: 'precomputed' needs data from a PreferenceDataModule")
        missing = [split for split in datasets_ if split not in self.tables]
        if not missing:
            return
        identity = {**self.identity(), "precision": str(trainer.precision)}
        batch_size = trainer.datamodule.hparams.batch_size
        for split in missing:
            self.tables[split] = load_or_compute(trainer, datasets_[split], identity, self.cache_dir, self.build,
                                                 self.pad_token_id, batch_size, split)

    def attach(self, batch: PreferenceBatch) -> None:
        """The batch's rows' reference log-probs, by example index and response column. # (N,)"""
        table = self.tables.get(batch.split)
        if table is None or batch.example_index is None:
            raise TrainingError(f"reference_mode 'precomputed': no reference log-probs for split {batch.split!r}")
        batch.reference_logps = table[batch.example_index, batch.response_column]

    def logps(self, policy: SequenceScorer, batch: PreferenceBatch,
              kl_rows: KLRows | None = None) -> tuple[Tensor, Tensor | None]:
        if batch.reference_logps is None:
            raise TrainingError("reference_mode 'precomputed' but the batch carries no reference log-probs")
        return batch.reference_logps, None


@dataclass(frozen=True)
class ReferenceOptions:
    """The module options a reference is built from (``model.reference*``, as ``PreferenceModule`` documents them).

    Attributes:
        mode: ``model.reference_mode``.
        spec: what a reference model is loaded from: ``model.reference``, else the policy's own spec.
        model_kwargs: its ``from_pretrained`` arguments (``reference_model_kwargs``, else the policy's).
        copy_policy: no ``model.reference`` was given: a copy of the freshly loaded policy serves where one is at
            hand (else ``spec`` is loaded, with the same seed: the same initial weights).
        dtype: ``model.reference_dtype`` (``None``: the policy's parameter dtype).
        seed: the seed of a config-dict model's initialization.
        chunk_size: the scorer's LM-head chunk.
        response_only_head: the scorer's response-only head.
        sync_steps: TR-DPO's ``ref_sync_steps``.
        sync_alpha: TR-DPO's ``ref_sync_alpha``.
        cache_dir: ``reference_cache_dir`` of precomputed tables.
    """

    mode: str
    spec: ModelSpec
    model_kwargs: dict[str, Any] | None
    copy_policy: bool
    dtype: torch.dtype | None
    seed: int = 0
    chunk_size: int | None = None
    response_only_head: bool = True
    sync_steps: int | None = None
    sync_alpha: float = 1.0
    cache_dir: str | None = None

    @classmethod
    def from_hparams(cls, hp: Any) -> ReferenceOptions:
        """From a ``PreferenceModule``'s hyperparameters."""
        own = hp.reference is None
        kwargs = hp.model_kwargs if own or hp.reference_model_kwargs is None else hp.reference_model_kwargs
        return cls(hp.reference_mode, hp.policy if own else hp.reference, kwargs, own,
                   getattr(torch, hp.reference_dtype) if hp.reference_dtype else None, hp.init_seed, hp.chunk_size,
                   hp.response_only_head, hp.ref_sync_steps, hp.ref_sync_alpha, hp.reference_cache_dir)


def build_reference(
    options: ReferenceOptions, policy: nn.Module, load: Callable[[ModelSpec, dict[str, Any] | None, torch.dtype | None], nn.Module],
    *, parameter_dtype: torch.dtype, pad_token_id: int, needed: bool = True, predicting: bool = False,
) -> Reference:
    """The reference ``options.mode`` asks for.

    A loss that needs no reference (``needed`` false) gets none, except in ``adapter`` mode, whose reference costs
    nothing until used (``predict`` writes its completions); ``predict`` in ``precomputed`` mode gets the
    reference model, whose completions go next to the policy's.

    Args:
        options: the reference options.
        policy: the freshly loaded policy model (before any training).
        load: loads a model as the module loads its models: ``(spec, model_kwargs, dtype) -> model``.
        parameter_dtype: the policy's parameter dtype (a reference built in it, unless ``options.dtype``).
        pad_token_id: the tokenizer's pad id (precomputed tables are scored on padded batches).
        needed: the loss reads reference log-probs.
        predicting: the trainer runs ``predict``.
    """
    mode = options.mode
    if mode in ("model", "precomputed") and not needed:
        mode = "none"
    if mode == "precomputed" and predicting:
        mode = "model"

    def model(copy_of: nn.Module | None = None) -> ModelReference:
        if options.copy_policy and copy_of is not None:
            reference = copy.deepcopy(copy_of).to(options.dtype) if options.dtype else copy.deepcopy(copy_of)
        else:
            reference = load(options.spec, options.model_kwargs, options.dtype)
        device = next(policy.parameters()).device
        return ModelReference(reference.to(device), options.chunk_size, options.response_only_head,
                              options.sync_steps, options.sync_alpha)

    def identity() -> dict[str, Any]:
        """What the reference's log-probs depend on: its weights by content, the dtype it is built in, its
        loading arguments and the log-prob settings."""
        return {"weights": weights_fingerprint(options.spec, options.model_kwargs, options.seed),
                "dtype": str(options.dtype or parameter_dtype), "model_kwargs": options.model_kwargs,
                "response_only_head": options.response_only_head}

    if mode == "model":
        return model(copy_of=policy)
    if mode == "adapter":
        return AdapterReference()
    if mode == "precomputed":
        return PrecomputedReference(identity, model, pad_token_id, options.cache_dir)
    return NoReference()
