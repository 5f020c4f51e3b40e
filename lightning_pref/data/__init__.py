"""Preference data: reading, tokenizing at the prompt/response seam, collating."""

from lightning_pref.data.collate import PreferenceCollator
from lightning_pref.data.datamodule import PreferenceDataModule

__all__ = ["PreferenceCollator", "PreferenceDataModule"]
