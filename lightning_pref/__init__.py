"""lightning-pref: preference optimization of causal LMs (DPO, cDPO, IPO, KTO, ...) on PyTorch Lightning."""

from lightning_pref.losses import PreferenceLoss
from lightning_pref.registry import get_loss, list_losses, register_loss
from lightning_pref.types import LossOutput, PreferenceBatch, SequenceLogps

__all__ = [
    "LossOutput",
    "PreferenceBatch",
    "PreferenceLoss",
    "SequenceLogps",
    "get_loss",
    "list_losses",
    "register_loss",
]
__version__ = "0.1.0"

from lightning_pref.data import PreferenceDataModule  # noqa: E402  (after the loss API, which it uses)
from lightning_pref.module import PreferenceModule  # noqa: E402
from lightning_pref.online import OnPolicyModule  # noqa: E402
from lightning_pref.policy import PolicyModule  # noqa: E402
from lightning_pref.reward import RewardModule  # noqa: E402
from lightning_pref.rl import PolicyGradientModule  # noqa: E402

__all__ += ["OnPolicyModule", "PolicyGradientModule", "PolicyModule", "PreferenceDataModule", "PreferenceModule",
            "RewardModule"]
