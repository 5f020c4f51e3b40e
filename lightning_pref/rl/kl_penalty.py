r"""The KL penalty to the reference: per-token estimators of :math:`KL(\pi_\theta \| \pi_{ref})` and the controller
of its coefficient.

On tokens sampled from :math:`\pi_\theta`, with :math:`\rho = \pi_{ref}(y_t) / \pi_\theta(y_t)` (Schulman 2020,
"Approximating KL Divergence"):

- ``k1`` :math:`= -\log \rho = \log \pi_\theta - \log \pi_{ref}`: unbiased, can be negative per token; in the
  *reward* its expectation is exactly the KL (InstructGPT's form, and the default here);
- ``k2`` :math:`= \tfrac12 (\log \rho)^2`: biased, low variance, its gradient is the KL's gradient;
- ``k3`` :math:`= (\rho - 1) - \log \rho`: unbiased and non-negative as a value (GRPO's, Shao et al. 2024, Eq. 4);
  but used as a *loss* its gradient is not the KL's (huggingface/trl#4967): placed in the loss, prefer ``k2``.

The coefficient :math:`\beta` is fixed, or adapted towards a target KL (Ziegler et al. 2019, §2.2).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]


def kl_estimate(logps: Tensor, reference_logps: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """Per-token estimate of the KL from sampled tokens' log-probs under the policy and the reference.
    # (N, L), (N, L) -> (N, L)"""
    log_ratio = reference_logps - logps  # log rho
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return log_ratio.exp() - 1 - log_ratio
    raise ValueError(f"kl.estimator: {estimator!r} is not one of k1, k2, k3")


class KLController:
    r"""The KL coefficient :math:`\beta`: fixed, or adaptive (Ziegler et al. 2019, "Fine-Tuning Language Models
    from Human Preferences", arXiv:1909.08593, §2.2):

    .. math::
        e_t = \operatorname{clip}\Big(\frac{KL_t - KL_{target}}{KL_{target}}, -0.2, 0.2\Big), \qquad
        \beta_{t+1} = \beta_t \,(1 + K_\beta e_t), \qquad K_\beta = n / \text{horizon}

    with :math:`KL_t` the measured KL per completion (summed k1 over its tokens, averaged over completions) and
    :math:`n` the completions the update saw.

    Args:
        coef: the initial (or fixed) :math:`\beta \ge 0`.
        target: the target KL per completion; ``None`` keeps :math:`\beta` fixed.
        horizon: completions over which an error is corrected (10,000 in the paper).
    """

    def __init__(self, coef: float, target: float | None = None, horizon: int = 10_000) -> None:
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, completions: int) -> None:
        """Move :math:`\beta` after a rollout whose mean KL per completion was ``kl``."""
        if self.target is None:
            return
        error = min(max((kl - self.target) / self.target, -0.2), 0.2)
        self.value *= 1 + error * completions / self.horizon  # §2.2
