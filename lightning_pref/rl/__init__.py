"""The RL stage of RLHF: ``PolicyGradientModule`` (PPO with a critic, RLOO, GRPO, REINFORCE++), its advantage
estimators (one file each, :mod:`lightning_pref.rl.advantages`), the KL penalty, PPO's clipped objectives, the
critic and PPO-ptx.

Names are imported on first use: listing the estimators (``lightning-pref losses``) needs none of Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CriticOptions": "lightning_pref.rl.critic",
    "KLOptions": "lightning_pref.rl.module",
    "PolicyGradientModule": "lightning_pref.rl.module",
    "PtxOptions": "lightning_pref.rl.ptx",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_pref.rl' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value
