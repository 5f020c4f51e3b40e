"""Built-in loss plugins. Importing this package registers them."""

from lightning_pref.losses.apo_zero import APOZeroLoss
from lightning_pref.losses.base import PreferenceLoss, logratios
from lightning_pref.losses.bco_pair import BCOPairLoss
from lightning_pref.losses.cdpo import CDPOLoss
from lightning_pref.losses.dpo import DPOLoss
from lightning_pref.losses.hinge import HingeLoss
from lightning_pref.losses.ipo import IPOLoss
from lightning_pref.losses.kto import KTOLoss
from lightning_pref.losses.nca_pair import NCAPairLoss
from lightning_pref.losses.nll import NLLLoss
from lightning_pref.losses.orpo import ORPOLoss
from lightning_pref.losses.robust import RobustDPOLoss
from lightning_pref.losses.simpo import SimPOLoss
from lightning_pref.losses.sppo_hard import SPPOHardLoss
from lightning_pref.losses.weighted import WeightedLoss

__all__ = [
    "APOZeroLoss",
    "BCOPairLoss",
    "CDPOLoss",
    "DPOLoss",
    "HingeLoss",
    "IPOLoss",
    "KTOLoss",
    "NCAPairLoss",
    "NLLLoss",
    "ORPOLoss",
    "PreferenceLoss",
    "RobustDPOLoss",
    "SPPOHardLoss",
    "SimPOLoss",
    "WeightedLoss",
    "logratios",
]
