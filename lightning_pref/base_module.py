"""What a policy and a reward model train with alike: :class:`BaseModule`.

Both ``PreferenceModule`` and ``RewardModule`` load a Hugging Face model as the user configured it (parameter
dtype from the trainer's precision, the model's own tokenizer, dropout off, activation checkpointing, FLOP count,
one line saying which dtype and why), train it in train mode whatever mode it loaded in, build optimizer and
scheduler from factories, log per-step and per-epoch metrics alike, skip or stop on a non-finite loss on every
device alike, keep their loss plugin's spec in checkpoints, and load checkpoints strictly (allowing only keys a
subclass leaves out on purpose) and with one-line errors.
"""

from __future__ import annotations

import inspect
import random
import warnings
from pathlib import Path
from typing import Any, ClassVar, get_args

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from transformers import AutoModelForCausalLM

from lightning_pref import layout
from lightning_pref.checks import check_choice, check_range
from lightning_pref.errors import TrainingError, UserInputError
from lightning_pref.models import (
    CheckpointMethod,
    DtypeName,
    ModelSpec,
    enable_activation_checkpointing,
    load_configured,
    model_tokenizer,
    parameter_dtype,
    storage_dtype,
)
from lightning_pref.registry import Registry, UnknownPluginError
from lightning_pref.throughput import flop_parameters
from lightning_pref.types import PreferenceBatch

_OTHER_MODEL = "it was written for another model: use the model options it was trained with"
# Lightning notes that a module's on_before_batch_transfer is used although a data module is given: ours
# prepares every batch on purpose (layout, KL rows, precomputed reference), whatever data module feeds it.
_BATCH_HOOK_NOTE = r"You have overridden `on_before_batch_transfer` in `LightningModule` but have passed in a"
# Lightning warns about any module in eval mode when training starts; a frozen reference is, on purpose.
_EVAL_MODE_NOTE = r"Found \d+ module\(s\) in eval mode at the start of training"


def fused_adam(optimizer: torch.optim.Optimizer, precision_plugin: Any = None) -> torch.optim.Optimizer:
    """torch's ``Adam`` / ``AdamW`` with its fused kernel where the configuration chose no implementation
    (``foreach`` and ``fused`` unset): on CPU torch otherwise runs a loop over the parameters, 6x slower than the
    fused step (0.49 s against 0.08 s per step for a 135M-parameter model; TRL's default is the fused one).

    Left as it is: other optimizers, an implementation chosen, parameters the fused kernel does not take
    (sharded ``DTensor`` ones, a device it has no kernel for), and a gradient scaler (fp16 mixed precision:
    Lightning clips gradients only where the optimizer does not unscale them itself).
    """
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW) or getattr(precision_plugin, "scaler", None):
        return optimizer
    for group in [optimizer.defaults, *optimizer.param_groups]:
        chosen = group.get("foreach") is not None or group.get("fused") is not None
        if chosen or group.get("differentiable") or group.get("capturable"):
            return optimizer
    params = [p for group in optimizer.param_groups for p in group["params"]]
    devices = torch.utils._foreach_utils._get_fused_kernels_supported_devices()
    if not params or any(type(p) not in (torch.Tensor, nn.Parameter) or p.device.type not in devices for p in params):
        return optimizer
    groups = [{**group, "foreach": None, "fused": True} for group in optimizer.param_groups]
    accepted = inspect.signature(type(optimizer)).parameters  # defaults also hold internal flags
    defaults = {key: value for key, value in optimizer.defaults.items() if key in accepted}
    try:
        return type(optimizer)(groups, **{**defaults, "foreach": None, "fused": True})
    except (RuntimeError, ValueError):  # a dtype or device the kernel refuses after all
        return optimizer


class BaseModule(LightningModule):
    """The shared part of the lightning-pref modules; a subclass names its model and its loss registry.

    A subclass's ``__init__`` calls ``super().__init__(model, tokenizer, model_kwargs, optimizer, scheduler)``
    and builds its plugins with :meth:`plugin`; the hyperparameters saved are every constructor argument along
    the subclass chain (Lightning collects them from each ``__init__``), except the factories and the plugin
    objects named in :attr:`not_hparams`, which are saved as their specs.

    Attributes:
        model_field: the option that names the trained model (``model.policy``), in messages.
        plugin_registries: constructor arguments that take a registered plugin name, and their registries.
        trained_with: the plugin a checkpoint must have been trained with to be resumed (its spec is compared).
        not_hparams: constructor arguments not saved as hyperparameters as they are (objects and factories).
    """

    model_field: ClassVar[str] = "model.policy"
    plugin_registries: ClassVar[dict[str, Registry]] = {}
    trained_with: ClassVar[str] = "loss"
    not_hparams: ClassVar[tuple[str, ...]] = ("model", "optimizer", "scheduler")
    # What training batches are, linked to the data module by the CLI (``pairs``; on-policy: ``prompts`` or
    # ``rounds``, see ``PreferenceDataModule``).
    train_data: str = "pairs"
    # What validation batches are, linked likewise: ``pairs``, or ``prompts`` for a module that validates what its
    # policy writes (RL).
    val_data: str = "pairs"
    # Model FLOPs of the last training batch, for Lightning's ThroughputMonitor (lightning_pref.throughput).
    flops_per_batch: int | None = None
    flop_params: int = 0  # N of the estimate, counted before sharding
    # Dict attributes a subclass keeps in checkpoints under their own names (e.g. reward statistics).
    checkpointed_state: ClassVar[tuple[str, ...]] = ()
    # Constructor arguments whose effect a checkpoint carries (the optimizer's and scheduler's states, adapter
    # weights, a random-init model's seed): a resumed fit cannot change them, so a new value is refused.
    restored_by_checkpoint: ClassVar[tuple[str, ...]] = ("optimizer", "scheduler", "lora", "init_seed")

    def __init__(self, model: ModelSpec, tokenizer: str | None, model_kwargs: dict[str, Any] | None,
                 optimizer: Any, scheduler: Any) -> None:
        """The optimizer and scheduler factories, and the tokenizer (the model's own, from the same revision,
        when ``tokenizer`` is ``None``)."""
        super().__init__()
        self.save_hyperparameters(ignore=list(self.not_hparams))
        # Literal options are checked by the CLI's parser, not when a module is built from Python: a typo there
        # would otherwise fall through to a default branch (an unknown on_nonfinite acted as "skip").
        hp = self.hparams
        if "on_nonfinite" in hp:
            check_choice("model.on_nonfinite", hp.on_nonfinite, ("error", "skip"))
        if not isinstance(hp.get("gradient_checkpointing", False), bool):
            check_range("model.gradient_checkpointing", hp.gradient_checkpointing, 1, integer=True,
                        hint="true checkpoints every decoder layer, an integer n every n-th (or the bottom "
                             "n), false none")
        method = hp.get("gradient_checkpointing_method", "uniform")
        check_choice("model.gradient_checkpointing_method", method, get_args(CheckpointMethod))
        if method == "block" and isinstance(hp.gradient_checkpointing, bool):
            given = str(hp.gradient_checkpointing).lower()
            raise UserInputError(f"model.gradient_checkpointing_method: block recomputes the bottom n "
                                 f"decoder layers, and model.gradient_checkpointing is {given}; set it to n "
                                 "(an integer >= 1), or the method to uniform")
        for name in ("dtype", "reference_dtype"):
            if hp.get(name) is not None:
                check_choice(f"model.{name}", hp[name], get_args(DtypeName))
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.tokenizer = model_tokenizer(model, tokenizer, model_kwargs, self.model_field)
        self._finite_batches = 0

    def plugin(self, value: Any, registry: Registry, default: type | None, option: str) -> Any:
        """A plugin argument as an instance (given as one, or as the ``{class_path, init_args}`` spec checkpoints
        keep; ``None``: ``default()``), saved in the hyperparameters as its spec under the option's name.

        Raises:
            UserInputError: the spec names a plugin that cannot be found, or there is no default.
        """
        if isinstance(value, dict):
            try:
                value = registry.from_spec(value)
            except UnknownPluginError as err:
                raise UserInputError(f"{option}: {err}") from None
        if value is None:
            if default is None:
                raise UserInputError(f"{option}: required; one of {', '.join(registry.names())}")
            value = default()
        self.hparams[option.removeprefix("model.")] = value.spec
        return value

    # ------------------------------------------------------------------------------------------------- models
    def load_model(self, spec: ModelSpec, field: str, dtype: torch.dtype | None = None,
                   model_kwargs: dict[str, Any] | None = None, auto_class: Any = AutoModelForCausalLM,
                   **fields: Any) -> nn.Module:
        """Load ``spec`` as this module loads its models: the tokenizer's vocabulary size and pad id for a config
        dict, the module's seed, its parameter dtype (unless ``dtype``) and dropout off if configured."""
        hp = self.hparams
        return load_configured(spec, field, self.tokenizer, seed=hp.init_seed, dtype=dtype or self.parameter_dtype,
                               model_kwargs=model_kwargs, dropout=not hp.disable_dropout, auto_class=auto_class,
                               **fields)

    def load_trained_model(self, spec: ModelSpec, model_kwargs: dict[str, Any] | None = None,
                           auto_class: Any = AutoModelForCausalLM, **fields: Any) -> nn.Module:
        """:meth:`load_model` for the model this module trains: also activation checkpointing if configured, and
        the model's FLOP parameters (counted before any sharding or adapters)."""
        model = self.load_model(spec, self.model_field, model_kwargs=model_kwargs, auto_class=auto_class, **fields)
        self.checkpoint_activations(model)
        self.flop_params = flop_parameters(model)
        return model

    def checkpoint_activations(self, model: nn.Module) -> None:
        """Activation checkpointing on ``model`` as ``model.gradient_checkpointing`` says: none (false), every
        decoder layer (true), or for an integer n one layer in n or the bottom n layers
        (``model.gradient_checkpointing_method``), the top layer excepted."""
        hp = self.hparams
        if hp.gradient_checkpointing:
            enable_activation_checkpointing(model, int(hp.gradient_checkpointing),
                                            hp.get("gradient_checkpointing_method", "uniform"))

    def describe_dtype(self, what: str, model: nn.Module) -> str:
        """``<what> parameters <dtype> (<why>; checkpoint <storage dtype>)``: the start-up line, shared by every
        module so a user reads the same sentence whatever they train."""
        hp = self.hparams
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        why = "model.dtype" if hp.dtype else f"trainer.precision {self._trainer.precision}"
        spec = hp[self.model_field.removeprefix("model.")]
        return f"lightning-pref: {what} parameters {dtype} ({why}; checkpoint {storage_dtype(spec, hp.model_kwargs)})"

    @property
    def layout_scorers(self) -> list[Any]:
        """The models that run every training batch, each with ``runnable(packed) -> (layout or None, masks)``
        (a subclass names them)."""
        return []

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """On the CPU, before the batch moves: lay it out as the models can run it (:meth:`runnable_layout`)."""
        if isinstance(batch, PreferenceBatch):
            self.runnable_layout(batch)
        return batch

    def runnable_layout(self, batch: PreferenceBatch) -> None:
        """Replace a packed batch's layout by the one every scorer of this module runs (shared prompts, plain
        packing, or padding), so no forward converts it on the device and what is logged about the batch
        (``train/padding_fraction``, the FLOPs) describes the layout that ran, not one a model fell back from."""
        for scorer in self.layout_scorers:
            if batch.packed is None:
                return
            usable, _ = scorer.runnable(batch.packed)
            if usable is None:
                batch.input_ids, batch.attention_mask, batch.response_mask = layout.unpack(batch.packed)
                batch.packed = None
            else:
                batch.packed = usable

    def log_batch_cost(self, batch: PreferenceBatch, no_grad_passes: int = 0, extra_no_grad_tokens: int = 0) -> None:
        """Set ``flops_per_batch`` (6N per real token of the trained pass, 2N per token of each pass without
        gradient) and log the batch's ``train/padding_fraction``."""
        tokens = batch.real_tokens
        self.flops_per_batch = self.flop_params * (tokens * (6 + 2 * no_grad_passes) + 2 * extra_no_grad_tokens)
        self.log("train/padding_fraction", batch.padding_fraction, on_step=True, on_epoch=False,
                 batch_size=batch.num_sequences)

    def log_metrics(self, stage: str, values: dict[str, Tensor], batch_size: int, progress_bar: tuple[str, ...] = (),
                    ) -> None:
        """Log a training step's values per step (those named in ``progress_bar`` also on the bar), in one call
        each; ``values`` keys are without the ``train/`` prefix."""
        logged = {f"{stage}/{k}": v for k, v in values.items()}
        for on_bar in (True, False):
            part = {k: v for k, v in logged.items() if (k in progress_bar) is on_bar}
            if part:
                self.log_dict(part, prog_bar=on_bar, on_step=True, on_epoch=False, batch_size=batch_size)

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        """Modules that generate (policies) override this; the others refuse ``predict`` and ``evaluate`` in one
        line rather than fail inside ``forward`` on a batch of prompts."""
        raise UserInputError(
            f"model: {type(self).__name__} does not generate text, so predict and evaluate cannot run it; they need a "
            "policy module (PreferenceModule, OnPolicyModule or PolicyGradientModule). A reward model judges: export "
            "it and pass --judge reward_model --judge.path DIR"
        )

    def setup(self, stage: str) -> None:
        # Notes Lightning gives about what these modules do on purpose; registered when a run starts, not at import.
        for note in (_BATCH_HOOK_NOTE, _EVAL_MODE_NOTE):
            warnings.filterwarnings("ignore", message=note)

    @property
    def parameter_dtype(self) -> torch.dtype:
        """The trained parameters' dtype: ``model.dtype``, else from the trainer's precision (fp32 without one)."""
        precision = self._trainer.precision if self._trainer is not None else None
        return parameter_dtype(precision, self.hparams.get("dtype"))

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer updates."""
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        return self.build_optimizers(self.trainable_parameters())

    def describe_updates(self) -> str:
        """Where :attr:`updates_per_batch` comes from, in the options' words."""
        return "one a batch"

    @property
    def updates_per_batch(self) -> int:
        """Optimizer steps a training batch takes: one, as Lightning counts; a module that takes several (manual
        optimization) says how many, so that a schedule spans the run's updates, not its batches."""
        return 1

    def total_updates(self) -> float:
        """The optimizer steps of the run, for a schedule that spans it: Lightning's estimate counts batches (epochs
        x batches, or ``trainer.max_steps``), ``trainer.max_steps`` counts updates and bounds them."""
        updates = self.trainer.estimated_stepping_batches * self.updates_per_batch
        return min(updates, self.trainer.max_steps) if self.trainer.max_steps != -1 else updates

    def build_optimizers(self, parameters: Any) -> Any:
        """The optimizer over ``parameters`` (tensors or parameter groups) and its scheduler, as Lightning takes
        them."""
        # The factories run only now: an argument they refuse (a negative lr, say) is one line naming the option.
        try:
            optimizer = self.optimizer_factory(parameters)
        except UserInputError:  # the CLI's builder has named the option already
            raise
        except ValueError as err:
            raise UserInputError(f"model.optimizer: {err}") from None
        _check_eps(optimizer, self._trainer.precision if self._trainer is not None else None)
        optimizer = fused_adam(optimizer, self.trainer.precision_plugin if self._trainer is not None else None)
        if self.scheduler_factory is None:
            return optimizer
        try:
            scheduler = self.scheduler_factory(optimizer)
            if hasattr(scheduler, "set_total_steps"):  # e.g. WarmupDecay: schedules that span the whole run
                scheduler.set_total_steps(self.total_updates())
        except UserInputError:  # the CLI's builder has named the option already
            raise
        except ValueError as err:
            raise UserInputError(f"model.scheduler: {err}") from None
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):  # steps on a metric, once an epoch
            monitor = getattr(scheduler, "monitor", None)  # lightning.pytorch.cli.ReduceLROnPlateau's
            if not monitor:
                raise UserInputError("model.scheduler: ReduceLROnPlateau steps on a logged metric and this one names "
                                     "none; use lightning.pytorch.cli.ReduceLROnPlateau with init_args.monitor (e.g. "
                                     "val/loss)")
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": monitor,
                                                             "interval": "epoch"}}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The optimizer step, then the gradients freed: Lightning would free them only after the next batch's
        forward (its closure zeroes them just before backward), so every forward would hold a full set of
        gradients next to its activations. A step's peak is then its end of backward (all gradients) or its
        forward (activations, what checkpointing saves), not both at once."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

    def on_fit_start(self) -> None:
        # from_pretrained returns eval mode and Lightning keeps each module's mode: without this a loaded model
        # would train in eval mode (gradient checkpointing and dropout silently off). Subclasses keep frozen
        # parts in eval mode by overriding ``train``.
        self.train()
        self._finite_batches = 0
        trainer = self.trainer  # Lightning takes these as given: a negative accumulation flips every update's sign
        if not (isinstance(trainer.accumulate_grad_batches, int) and trainer.accumulate_grad_batches >= 1):
            raise UserInputError(f"trainer.accumulate_grad_batches: must be an integer >= 1, got "
                                 f"{trainer.accumulate_grad_batches!r} (1: no accumulation)")
        if trainer.gradient_clip_val is not None and not trainer.gradient_clip_val >= 0:  # Lightning skips it
            raise UserInputError(f"trainer.gradient_clip_val: must be >= 0, got {trainer.gradient_clip_val} (0 or "
                                 "null: no clipping)")
        steps, per_batch = trainer.max_steps, self.updates_per_batch
        if steps != -1 and steps % per_batch:  # Lightning stops only between batches: the run would go past it
            whole = f"{steps - steps % per_batch} or {steps - steps % per_batch + per_batch}".removeprefix("0 or ")
            raise UserInputError(f"trainer.max_steps: {steps} optimizer updates is not a whole number of training "
                                 f"batches of {per_batch} updates each ({self.describe_updates()}); use {whole}")

    # ---------------------------------------------------------------------------------------- non-finite losses
    def checked_loss(self, loss: Tensor, zero: Tensor, batch_idx: int) -> Tensor:
        """``loss``, or on a non-finite loss (decided jointly, so every device does the same) an error, or with
        ``model.on_nonfinite: skip`` a zero-weighted loss: not ``None``, which Lightning refuses on several
        devices, so every device still runs its backward and its collectives and this batch adds nothing.

        Args:
            loss: the batch's loss.
            zero: a finite tensor that depends on the trainable parameters (e.g. the batch's log-probs) to build
                the zero-weighted loss from.
            batch_idx: for the message.
        """
        nonfinite = self.trainer.strategy.reduce_boolean_decision(not torch.isfinite(loss).item(), all=False)
        if not nonfinite:
            self._finite_batches += 1
            return loss
        where = f"step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})"
        if self.hparams.on_nonfinite == "error":
            raise TrainingError(
                f"non-finite loss ({loss.item()}) at {where}; {self._nonfinite_cause()}, or set model.on_nonfinite: "
                "skip to skip such batches"
            )
        warnings.warn(f"non-finite loss at {where}: batch skipped (model.on_nonfinite: skip)", stacklevel=3)
        return zero.nan_to_num(0.0, 0.0, 0.0).sum() * 0.0

    def _nonfinite_cause(self) -> str:
        """What a non-finite loss comes from, where it can be told: weights an earlier update made non-finite (a
        step too large), or, with no update taken yet, the forward itself (the data, or float16 overflow), which
        no learning rate changes. Local to this process: it only words the message."""
        lower_precision = self.parameter_dtype == torch.float16 or "16" in str(
            self._trainer.precision if self._trainer is not None else "")
        if any(not torch.isfinite(p).all() for p in self.trainable_parameters()):
            return ("the weights are already non-finite: an earlier optimizer step diverged; lower the learning rate "
                    "(or raise the optimizer's eps" + (", or use bf16/fp32 weights" if lower_precision else "") + ")")
        if self.global_step == 0:
            return ("no update has been taken yet, so it is not the learning rate: check that batch's data (and loss "
                    "options)" + ("; float16 activations overflow easily: try bf16 or 32-true" if lower_precision
                                  else ""))
        return "lower the learning rate or check that batch's data"

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # A step whose every batch was skipped, or whose gradients are not finite after all (a non-finite
        # activation leaks through even a zero weight), is not taken: without gradients, optimizers skip the
        # parameters (no momentum or weight-decay update either). Decided jointly, like the skip itself.
        skipped = self._finite_batches == 0
        if not skipped and self.hparams.on_nonfinite == "skip":
            local = any(p.grad is not None and not torch.isfinite(p.grad).all() for p in self.trainable_parameters())
            skipped = self.trainer.strategy.reduce_boolean_decision(local, all=False)
        if skipped:
            optimizer.zero_grad(set_to_none=True)
        self._finite_batches = 0

    # ---------------------------------------------------------------------------------------------- checkpoints
    def may_be_missing(self, key: str) -> bool:
        """Whether a checkpoint may lack this state key (left out on purpose, rebuilt from the config)."""
        return False

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave out what may be missing, keep :attr:`checkpointed_state`, and the RNG states for an exact resume."""
        state = checkpoint["state_dict"]
        for key in [k for k in state if self.may_be_missing(k)]:
            del state[key]
        for name in self.checkpointed_state:
            checkpoint[name] = dict(getattr(self, name))
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()

    @property
    def strict_loading(self) -> bool:
        """Whether Lightning's own loading is strict: not under FSDP2, which loads parameter by parameter and
        would refuse the keys left out on purpose; there :meth:`on_load_checkpoint` checks the keys instead.
        Elsewhere :meth:`load_state_dict` checks them."""
        if self._strict_loading is not None:
            return self._strict_loading
        return self.device_mesh is None

    @strict_loading.setter
    def strict_loading(self, value: bool) -> None:
        self._strict_loading = value

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load weights, allowing exactly the keys :meth:`may_be_missing` names to be missing and nothing else,
        whatever ``strict`` a caller asks for.

        Raises:
            UserInputError: a key is missing or unexpected, or a shape does not fit: the checkpoint belongs to
                another model.
        """
        try:
            result = super().load_state_dict(state_dict, strict=False, assign=assign)
        except RuntimeError as err:  # size mismatches are raised even when not strict
            detail = " ".join(str(err).split("\n\t")[1:2]).strip() or str(err).splitlines()[0]
            raise UserInputError(f"--ckpt_path: the checkpoint does not fit this model ({detail}); {_OTHER_MODEL}") from None
        self._check_keys(result.missing_keys, result.unexpected_keys)
        return result

    def _check_keys(self, missing: list[str], unexpected: list[str]) -> None:
        missing = [k for k in missing if not self.may_be_missing(k)]
        if missing or unexpected:
            what = f"missing {_few(missing)}" if missing else f"unexpected {_few(unexpected)}"
            raise UserInputError(f"--ckpt_path: the checkpoint does not fit this model ({what}); {_OTHER_MODEL}")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint trained with another loss, or (where the strategy loaded the weights itself,
        non-strictly) one whose keys do not fit; restore the RNG states when resuming."""
        name = self.trained_with
        trained, current = checkpoint.get("hyper_parameters", {}).get(name), getattr(self, name, None)
        if self._trainer is not None and isinstance(trained, dict) and current is not None and trained != current.spec:
            raise UserInputError(
                f"--ckpt_path: the checkpoint was trained with {describe_spec(trained)} but model.{name} is "
                f"{describe_spec(current.spec)}; give the {name} it was trained with (its run's config.yaml has it), "
                "or export the model and start a new run from it"
            )
        path = self._trainer.ckpt_path if self._trainer is not None else None
        if "state_dict" not in checkpoint and path is not None and Path(path).is_file():
            saved = torch.load(path, map_location="cpu", mmap=True, weights_only=False)["state_dict"].keys()
            expected = self.state_dict().keys()
            self._check_keys([k for k in expected if k not in saved], [k for k in saved if k not in expected])
        for name in self.checkpointed_state:
            setattr(self, name, dict(checkpoint.get(name) or {}))
        rng = checkpoint.get("rng_states")
        if rng is not None and self._trainer is not None:  # resuming a run, not loading weights for inference
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])


def _check_eps(optimizer: torch.optim.Optimizer, precision: str | None) -> None:
    """Refuse an optimizer ``eps`` that the parameters' dtype cannot hold: Adam's default 1e-8 is 0 in float16
    (``16-true``), so its first update divides by zero (a zero second moment) and the loss is NaN at step 1, a
    failure the learning rate has nothing to do with.

    Raises:
        UserInputError: naming the eps, the dtype, what it becomes and the fixes.
    """
    for group in optimizer.param_groups:
        eps = group.get("eps")
        if not isinstance(eps, float) or eps <= 0:
            continue
        for dtype in {p.dtype for p in group["params"] if p.is_floating_point()}:
            tiny = torch.finfo(dtype).tiny  # below the smallest normal number, eps is 0 or loses its precision
            if eps < tiny:
                held = float(torch.tensor(eps, dtype=dtype))
                raise UserInputError(
                    f"model.optimizer: eps {eps:g} is {held:g} in {str(dtype).removeprefix('torch.')} (the "
                    f"parameters' dtype{f' under trainer.precision {precision}' if precision else ''}; the smallest "
                    f"normal number is {tiny:.3g}), so the update divides by about zero and the loss is NaN after "
                    f"the first step; set model.optimizer.init_args.eps to 1e-4 or more, or train with fp32 master "
                    "weights (trainer.precision 16-mixed or bf16-mixed)"
                )


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def describe_spec(spec: dict[str, Any]) -> str:
    """``Name(arg=value, ...)`` of a ``{class_path, init_args}`` spec, for messages."""
    args = ", ".join(f"{k}={v!r}" for k, v in (spec.get("init_args") or {}).items())
    return f"{spec['class_path'].rsplit('.', 1)[-1]}({args})"
