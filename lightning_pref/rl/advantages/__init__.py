"""Advantage estimators (``model.estimator`` of ``PolicyGradientModule``), one file each. Importing this package
registers the built-ins: ``gae`` (PPO with a critic), ``rloo``, ``grpo``, ``reinforce_pp``."""

from lightning_pref.rl.advantages.base import AdvantageEstimator, Advantages
from lightning_pref.rl.advantages.gae import GAE
from lightning_pref.rl.advantages.grpo import GRPO
from lightning_pref.rl.advantages.reinforce_pp import ReinforcePP
from lightning_pref.rl.advantages.rloo import RLOO

__all__ = ["GAE", "GRPO", "RLOO", "AdvantageEstimator", "Advantages", "ReinforcePP"]
