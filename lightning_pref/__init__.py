"""lightning-pref: preference optimization of causal LMs (DPO, cDPO, IPO, KTO, ...) on PyTorch Lightning."""

from __future__ import annotations

from lightning_pref.lazy import lazy_exports

__version__ = "0.1.0"

#: Each public name and the module that defines it. They are imported on first use, not with the package, so
#: that ``lightning-pref losses``, ``report`` or ``--help`` start without Lightning, transformers and datasets
#: (every ``import lightning_pref.<anything>`` runs this file first).
_EXPORTS = {
    "LossOutput": "lightning_pref.types",
    "PreferenceBatch": "lightning_pref.types",
    "PreferenceLoss": "lightning_pref.losses",
    "SequenceLogps": "lightning_pref.types",
    "get_loss": "lightning_pref.registry",
    "list_losses": "lightning_pref.registry",
    "register_loss": "lightning_pref.registry",
    "OnPolicyModule": "lightning_pref.online",
    "PreferenceDataModule": "lightning_pref.data",
    "PreferenceModule": "lightning_pref.module",
    "RewardModule": "lightning_pref.reward",
    "PolicyModule": "lightning_pref.policy",
    "PolicyGradientModule": "lightning_pref.rl",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
