"""Pairwise reward-model losses. Importing this package registers them (``lightning_pref.reward_losses``)."""

from lightning_pref.reward.losses.base import RewardLoss
from lightning_pref.reward.losses.bradley_terry import BradleyTerryLoss
from lightning_pref.reward.losses.centered import CenteredBradleyTerryLoss
from lightning_pref.reward.losses.margin_ranking import MarginRankingLoss

__all__ = ["BradleyTerryLoss", "CenteredBradleyTerryLoss", "MarginRankingLoss", "RewardLoss"]
