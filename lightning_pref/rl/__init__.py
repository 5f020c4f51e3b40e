"""The RL stage of RLHF: ``PolicyGradientModule`` (PPO with a critic, RLOO, GRPO, REINFORCE++), its advantage
estimators (one file each, :mod:`lightning_pref.rl.advantages`), the KL penalty, PPO's clipped objectives, the
critic and PPO-ptx.

Names are imported on first use: listing the estimators (``lightning-pref losses``) needs none of Lightning.
"""

from __future__ import annotations

from lightning_pref.lazy import lazy_exports

_EXPORTS = {
    "CriticOptions": "lightning_pref.rl.critic",
    "KLOptions": "lightning_pref.rl.module",
    "PolicyGradientModule": "lightning_pref.rl.module",
    "PtxOptions": "lightning_pref.rl.ptx",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
