"""Reward models: the Bradley–Terry stage of RLHF on the same data, registry mechanism, metrics and CLI."""

from __future__ import annotations

import importlib
from typing import Any

from lightning_pref.reward.losses import (
    BradleyTerryLoss,
    CenteredBradleyTerryLoss,
    MarginRankingLoss,
    RewardLoss,
)

#: The module's names are imported on first use, not with the package: its losses (which ``lightning-pref
#: losses`` lists) then load without Lightning and transformers.
_MODULE_EXPORTS = ("RewardModule", "RewardScorer", "last_token")

__all__ = ["BradleyTerryLoss", "CenteredBradleyTerryLoss", "MarginRankingLoss", "RewardLoss", *_MODULE_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _MODULE_EXPORTS:
        raise AttributeError(f"module 'lightning_pref.reward' has no attribute {name!r}")
    return getattr(importlib.import_module("lightning_pref.reward.module"), name)
