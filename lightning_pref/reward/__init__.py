"""Reward models: the Bradley–Terry stage of RLHF on the same data, registry mechanism, metrics and CLI."""

from lightning_pref.reward.losses import (
           BradleyTerryLoss,
           CenteredBradleyTerryLoss,
           MarginRankingLoss,
           RewardLoss,
)
from lightning_pref.reward.module import RewardModule, RewardScorer, last_token

__all__ = ["BradleyTerryLoss", "CenteredBradleyTerryLoss", "MarginRankingLoss", "RewardLoss", "RewardModule",
           "RewardScorer", "last_token"]
