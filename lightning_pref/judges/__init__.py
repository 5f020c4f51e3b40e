"""Judges of completions (``evaluate``, on-policy training). Importing this package registers the built-ins."""

from lightning_pref.judges.base import Judge, Prompt
from lightning_pref.judges.function import FunctionJudge
from lightning_pref.judges.reward_model import RewardModelJudge
from lightning_pref.judges.rules import NoShoutingJudge

__all__ = ["FunctionJudge", "Judge", "NoShoutingJudge", "Prompt", "RewardModelJudge"]
