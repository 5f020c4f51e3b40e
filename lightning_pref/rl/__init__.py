"""The RL stage of RLHF: ``PolicyGradientModule`` (PPO with a critic, RLOO, GRPO, REINFORCE++), its advantage
estimators (one file each), the KL penalty, PPO's clipped objectives, the critic and PPO-ptx."""

import lightning_pref.rl.advantages  # noqa: F401  (registers the built-in estimators)
from lightning_pref.rl.critic import CriticOptions
from lightning_pref.rl.module import KLOptions, PolicyGradientModule
from lightning_pref.rl.ptx import PtxOptions

__all__ = ["CriticOptions", "KLOptions", "PolicyGradientModule", "PtxOptions"]
