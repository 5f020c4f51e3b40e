"""Export the trained policy as a standard Hugging Face model directory.

``lightning-pref export --ckpt_path out/.../last.ckpt --output_dir aligned-model`` writes ``save_pretrained``
weights, config and tokenizer, loadable with ``AutoModelForCausalLM.from_pretrained``. A LoRA policy is merged
into its base weights unless ``adapter_only`` is set.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, NamedTuple

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from lightning_pref.checks import check_output_path
from lightning_pref.errors import UserInputError
from lightning_pref.models import DtypeName, load_configured, model_tokenizer, quiet_saving
from lightning_pref.module import PreferenceModule
from lightning_pref.reference import AdapterReference
from lightning_pref.reward.export import load_reward_from_checkpoint, save_reward_model
from lightning_pref.runs import read_checkpoint

_POLICY_PREFIX = "policy."


_NO_ADAPTER = ("--adapter_only: this model has no LoRA adapter (it was not trained with reference_mode adapter, so "
               "every weight changed); drop adapter_only to export the whole model")


def _check_output_dir(output_dir: str | Path, overwrite: bool) -> Path:
    out = check_output_path("--output_dir", output_dir, "directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserInputError(f"--output_dir: {out} exists and is not empty; choose another or pass --overwrite true")
    out.mkdir(parents=True, exist_ok=True)
    return out


#: What ``save_pretrained`` writes for a model or a peft adapter: removed before writing into a directory that
#: holds them (``--overwrite true``), since a stale adapter beside new merged weights is loaded on top of them.
_MODEL_FILES = ("config.json", "generation_config.json", "adapter_config.json", "adapter_model.*", "model*.safetensors",
                "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")


def _remove_model_files(out: Path) -> None:
    for pattern in _MODEL_FILES:
        for path in out.glob(pattern):
            path.unlink()


class Policy(NamedTuple):
    """A trained policy as it is exported: the ``transformers`` model (a ``peft`` model in adapter mode) and its
    tokenizer."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase


def write_policy(policy: Policy, output_dir: str | Path, adapter_only: bool = False,
                 dtype: DtypeName | None = None) -> Path:
    """Write ``policy`` to ``output_dir`` with ``save_pretrained``: a LoRA policy merged into its base weights
    (unless ``adapter_only``), in ``dtype`` when given (else the trained parameters' dtype)."""
    out = Path(output_dir)
    model = policy.model
    if adapter_only and not hasattr(model, "merge_and_unload"):  # else the whole model would be written instead
        raise UserInputError(_NO_ADAPTER)
    if hasattr(model, "merge_and_unload") and not adapter_only:
        # Merge into a copy: the module keeps training (or validating) with its adapters intact.
        model = copy.deepcopy(model).merge_and_unload()
    if dtype is not None and getattr(torch, dtype) != next(model.parameters()).dtype:
        model = copy.deepcopy(model).to(getattr(torch, dtype))  # a copy: the module keeps its master weights
    _remove_model_files(out)
    with quiet_saving():
        model.save_pretrained(out)
    policy.tokenizer.save_pretrained(out)
    return out


def save_policy(
    module: PreferenceModule, output_dir: str | Path, adapter_only: bool = False, dtype: DtypeName | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``module``'s policy and tokenizer to ``output_dir`` (:func:`write_policy`).

    Args:
        module: the module whose policy to write.
        output_dir: the directory.
        adapter_only: for a LoRA policy, the adapter alone instead of merged weights.
        dtype: dtype of the saved weights; ``None`` keeps the trained parameters' dtype.
        state_dict: the policy's full weights (keys of ``module.policy.model``) where the module's own are
            sharded (:func:`gathered_policy_state`): they are put into an unsharded copy of the model.
    """
    model = module.policy.model if state_dict is None else _unsharded(module, state_dict)
    return write_policy(Policy(model, module.tokenizer), output_dir, adapter_only, dtype)


def gathered_policy_state(trainer: Trainer, module: PreferenceModule) -> dict[str, torch.Tensor] | None:
    """Under a sharded strategy (FSDP, FSDP2) the policy's full weights, gathered to CPU on rank 0; ``None``
    where every rank holds them whole. A collective: every rank must call it."""
    if not isinstance(trainer.strategy, FSDPStrategy | ModelParallelStrategy):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(trainer.strategy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    prefix = _POLICY_PREFIX + "model."
    return {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}


def _unsharded(module: PreferenceModule, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """A plain copy of the policy holding ``state_dict``: built on the meta device, the weights assigned."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(module.policy.lm.config)
        if hasattr(module.policy.model, "peft_config"):  # adapter mode: the same adapters around it
            model = AdapterReference.wrap(model, module.hparams.lora)
    model.load_state_dict(state_dict, assign=True)
    (model.get_base_model() if hasattr(model, "get_base_model") else model).tie_weights()
    return model


def load_policy_from_checkpoint(ckpt_path: str | Path | dict[str, Any]) -> Policy:
    """The policy of a checkpoint (a path, or the checkpoint already read), loaded as the run loaded it (its
    tokenizer, seed, loading arguments, adapters) with the trained weights, in the dtype it was trained in.

    Neither the reference nor the loss is built: any reference mode and any loss (including ones whose plugin is
    not installed here) export the same way.
    """
    checkpoint = ckpt_path if isinstance(ckpt_path, dict) else read_checkpoint(ckpt_path, mmap=False)
    hp = checkpoint.get("hyper_parameters", {})
    if "policy" not in hp:
        raise UserInputError("--ckpt_path: the checkpoint holds no policy (a reward model's? it exports as one)")
    state = {k[len(_POLICY_PREFIX) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(_POLICY_PREFIX)}
    trained = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    tokenizer = model_tokenizer(hp["policy"], hp.get("tokenizer"), hp.get("model_kwargs"), "model.policy")
    model = load_configured(hp["policy"], "model.policy", tokenizer, seed=hp.get("init_seed", 0), dtype=trained,
                            model_kwargs=hp.get("model_kwargs"), dropout=not hp.get("disable_dropout", True))
    if hp.get("reference_mode") == "adapter":
        model = AdapterReference.wrap(model, hp.get("lora"))
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    return Policy(model, tokenizer)


def export_checkpoint(
    ckpt_path: str, output_dir: str, overwrite: bool = False, adapter_only: bool = False,
    dtype: DtypeName | None = None,
) -> Path:
    """Export a lightning-pref checkpoint as a Hugging Face model directory: the policy
    (``AutoModelForCausalLM``), or a reward model (``AutoModelForSequenceClassification``, see
    ``lightning_pref/reward/export.py``).

    Args:
        ckpt_path: a checkpoint written by ``lightning-pref fit`` (e.g. ``.../checkpoints/last.ckpt``).
        output_dir: directory to write; must be empty or absent unless ``overwrite`` is set.
        overwrite: allow writing into a non-empty ``output_dir``.
        adapter_only: for a LoRA policy, save only the adapter instead of merged weights.
        dtype: dtype of the saved weights, e.g. ``bfloat16`` for half the size; ``None`` = as trained (fp32
            master weights under ``32-true``/``*-mixed``, which keep updates too small for bf16).
    """
    checkpoint = read_checkpoint(ckpt_path, mmap=False)
    if adapter_only and checkpoint["hyper_parameters"].get("reference_mode") != "adapter":  # before any writing
        raise UserInputError(_NO_ADAPTER)
    out = _check_output_dir(output_dir, overwrite)
    if "backbone" in checkpoint["hyper_parameters"]:
        _remove_model_files(out)
        return save_reward_model(load_reward_from_checkpoint(checkpoint), out, dtype)
    return write_policy(load_policy_from_checkpoint(checkpoint), out, adapter_only, dtype)


class ExportPolicy(Callback):
    """Opt-in callback: export the policy at the end of ``fit``.

    In YAML: ``trainer: {callbacks: [{class_path: lightning_pref.export.ExportPolicy, init_args: {output_dir: x}}]}``.

    Under sharded strategies every rank takes part in gathering the policy's full weights, and rank 0 writes
    them, so the directory holds whole tensors, as after a single-device run.

    Args:
        output_dir: directory to write (checked before training starts, so a run never ends unable to export).
        overwrite: allow writing into a non-empty ``output_dir``.
        adapter_only: for a LoRA policy, save only the adapter.
        dtype: dtype of the saved weights; ``None`` = as trained.
    """

    def __init__(
        self, output_dir: str, overwrite: bool = False, adapter_only: bool = False, dtype: DtypeName | None = None
    ) -> None:
        self.output_dir, self.overwrite, self.adapter_only, self.dtype = output_dir, overwrite, adapter_only, dtype

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.adapter_only and pl_module.hparams.get("reference_mode") != "adapter":  # not only once trained
            raise UserInputError(_NO_ADAPTER)
        if trainer.is_global_zero:
            _check_output_dir(self.output_dir, self.overwrite)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        state = gathered_policy_state(trainer, pl_module)  # every rank: a collective under sharded strategies
        if trainer.is_global_zero:
            save_policy(pl_module, self.output_dir, self.adapter_only, self.dtype, state_dict=state)
        trainer.strategy.barrier()
