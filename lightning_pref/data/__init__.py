"""Preference data: reading, format detection, tokenizing at the prompt/response seam, collating."""

from lightning_pref.data.collate import PreferenceCollator
from lightning_pref.data.datamodule import PreferenceDataModule
from lightning_pref.data.sampler import LengthGroupedSampler
from lightning_pref.data.stats import SplitStats

__all__ = ["LengthGroupedSampler", "PreferenceCollator", "PreferenceDataModule", "SplitStats"]
