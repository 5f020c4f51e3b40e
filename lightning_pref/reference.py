"""Where reference log-probs come from (``model.reference_mode``) and how the reference is kept in sync.

- ``model``: a frozen reference model next to the policy (a copy of its initial weights, or another model).
- ``precomputed``: reference log-probs computed once before training and cached on disk; no reference model in
  memory while training (see :mod:`lightning_pref.precompute`).
- ``none``: no reference at all, for losses with ``requires_reference = False``.
- ``adapter``: the policy is a LoRA model (``peft``); the reference is the same model with adapters disabled.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from lightning_pref.errors import UserInputError

ReferenceMode = Literal["model", "precomputed", "none", "adapter"]


def check_reference_mode(mode: str, loss: nn.Module, ref_sync_steps: int | None) -> None:
    """Refuse combinations that cannot work, with the field to change."""
    name = type(loss).__name__
    if mode == "none" and loss.requires_reference:
        raise UserInputError(
            f"model.reference_mode: 'none' gives no reference log-probs, but {name} requires them; use "
            "reference_mode 'model', 'precomputed' or 'adapter', or a reference-free loss (simpo, orpo, nll)"
        )
    if mode == "precomputed" and loss.requires_kl_baseline:
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


def apply_lora(model: nn.Module, lora: dict[str, Any] | None) -> nn.Module:
    """Wrap ``model`` with LoRA adapters (``peft.LoraConfig(**lora)``); only the adapters are trainable."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserInputError(
            "model.reference_mode: 'adapter' needs peft: pip install 'lightning-pref[peft]'"
        ) from None
    config = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear", **(lora or {})}
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **config))


@torch.no_grad()
def soft_update(reference: nn.Module, policy: nn.Module, alpha: float) -> None:
    """TR-DPO (Gorbatovski et al. 2024) soft update: ref <- (1 - alpha) * ref + alpha * policy."""
    for ref_param, param in zip(reference.parameters(), policy.parameters(), strict=True):
        ref_param.lerp_(param.to(ref_param.dtype), alpha)
