"""Register a loss with ``@register_loss`` in a script and train it on the embedded default.

    python examples/decorator_loss.py                            # 20 steps into outputs/gpo_exp
    python examples/decorator_loss.py --trainer.max_steps 100    # extra arguments go to `lightning-pref fit`

The decorator is the route for code you run yourself; a pip-installable package registers through an entry
point instead (see examples/custom_loss_plugin).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor

from lightning_pref import LossOutput, PreferenceLoss, SequenceLogps, register_loss
from lightning_pref.cli import main
from lightning_pref.losses import logratios

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dpo.yaml"  # the embedded default


# The name given to the decorator is what `--model.loss` accepts.
@register_loss("gpo_exp")
class ExponentialGPOLoss(PreferenceLoss):
    r"""Exponential loss of the GPO family, Tang et al. 2024, "Generalized Preference Optimization: A Unified
    Approach to Offline Alignment", arXiv:2402.05749:

    .. math::
        \mathcal{L} = \exp\big(-\beta (h_w - h_l)\big), \qquad h = \log \pi_\theta(y|x) / \pi_{ref}(y|x)

    GPO writes offline preference losses as :math:`f(\beta (h_w - h_l))` for a convex :math:`f`; the logistic
    :math:`f` gives DPO, this one :math:`f(t) = e^{-t}`.
    """

    paper = "Tang et al. 2024, arXiv:2402.05749 (GPO, exponential f)"

    def __init__(self, beta: float = 0.1) -> None:  # typed arguments become --model.loss.beta
        super().__init__()
        self.beta = beta

    def forward(
        self, policy: SequenceLogps, reference: SequenceLogps | None, *, kl_baseline: Tensor | None = None
    ) -> LossOutput:
        chosen, rejected = logratios(policy, reference)  # log pi/pi_ref of chosen and rejected, per pair
        return LossOutput(
            losses=torch.exp(-self.beta * (chosen - rejected)),  # per pair, unreduced
            chosen_rewards=self.beta * chosen.detach(),
            rejected_rewards=self.beta * rejected.detach(),
        )


if __name__ == "__main__":
    # Take the extra arguments out of sys.argv: LightningCLI warns when it gets both args and sys.argv flags.
    extra, sys.argv[1:] = sys.argv[1:], []
    # Same as `lightning-pref fit ...`, but in this process, where the decorator has registered "gpo_exp".
    main([
        "fit", "--config", str(CONFIG), "--model.loss", "gpo_exp",
        "--trainer.max_steps", "20", "--trainer.val_check_interval", "10",
        "--trainer.default_root_dir", "outputs/gpo_exp",
        *extra,  # later flags win, so these override the ones above
    ])
