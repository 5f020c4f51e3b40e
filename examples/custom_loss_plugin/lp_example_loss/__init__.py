"""Example lightning-pref loss plugin. The loss is registered by the entry point in ``pyproject.toml``."""

from lp_example_loss.dpop import DPOPLoss

__all__ = ["DPOPLoss"]
