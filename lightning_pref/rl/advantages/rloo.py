r"""REINFORCE with a leave-one-out baseline (RLOO)."""

from __future__ import annotations

from torch import Tensor

from lightning_pref.registry import register_advantage
from lightning_pref.rl.advantages.base import (
    AdvantageEstimator,
    Advantages,
    Reduce,
    grouped,
    per_token,
    sequence_returns,
)


@register_advantage("rloo")
class RLOO(AdvantageEstimator):
    r"""RLOO, Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
    Human Feedback in LLMs" (arXiv:2402.14740), the leave-one-out estimator of §3:

    .. math::
        \hat A_i = R_i - \frac{1}{k - 1} \sum_{j \ne i} R_j = \frac{k}{k-1}\big(R_i - \bar R\big),
        \qquad R_i = \sum_t r_{i,t}

    over the :math:`k` completions of one prompt: each completion's baseline is the mean return of the others,
    which does not depend on it, so the estimate is unbiased. :math:`R_i` is the whole completion's reward (the
    score minus the KL penalty, summed over its tokens); every token of completion :math:`i` gets :math:`\hat A_i`.
    """

    requires_groups = True
    paper = "Ahmadian et al. 2024, arXiv:2402.14740, §3"

    def __call__(self, rewards: Tensor, mask: Tensor, group_size: int, values: Tensor | None = None,
                 reduce: Reduce | None = None) -> Advantages:
        if group_size < 2:
            raise ValueError("rloo compares the completions of a prompt: it needs samples_per_prompt >= 2")
        returns = grouped(sequence_returns(rewards, mask), group_size)  # (B, k)
        baseline = (returns.sum(-1, keepdim=True) - returns) / (group_size - 1)  # mean of the other k - 1
        advantages = (returns - baseline).flatten()  # (N,)
        return Advantages(per_token(advantages, mask), per_token(returns.flatten(), mask))
