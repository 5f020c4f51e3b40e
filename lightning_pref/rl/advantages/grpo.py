r"""Group-relative advantages (GRPO), optionally without the standard-deviation scaling (Dr. GRPO)."""

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


@register_advantage("grpo")
class GRPO(AdvantageEstimator):
    r"""GRPO, Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
    Models" (arXiv:2402.03300), §4.1.2 (outcome supervision):

    .. math::
        \hat A_{i,t} = \frac{R_i - \operatorname{mean}(R_1, \dots, R_k)}{\operatorname{std}(R_1, \dots, R_k)}

    over the :math:`k` completions of one prompt, the same for each of completion :math:`i`'s tokens;
    :math:`R_i = \sum_t r_{i,t}` (the score, minus the KL penalty when it is placed in the reward). The standard
    deviation is the unbiased one (as TRL computes it), plus ``eps``. With ``scale_std: false`` the advantages are
    only centred: Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783), which
    argues the scaling over-weights prompts whose answers barely differ.

    Args:
        scale_std: divide by the group's standard deviation (GRPO) or not (Dr. GRPO).
        eps: added to the standard deviation (a group of equal rewards has none).
    """

    requires_groups = True
    paper = "Shao et al. 2024, arXiv:2402.03300, §4.1.2"

    def __init__(self, scale_std: bool = True, eps: float = 1e-4) -> None:
        if eps <= 0:
            raise ValueError(f"grpo: eps must be > 0, got {eps}")
        self.scale_std, self.eps = scale_std, eps

    def __call__(self, rewards: Tensor, mask: Tensor, group_size: int, values: Tensor | None = None,
                 reduce: Reduce | None = None) -> Advantages:
        if group_size < 2:
            raise ValueError("grpo compares the completions of a prompt: it needs samples_per_prompt >= 2")
        returns = grouped(sequence_returns(rewards, mask), group_size)  # (B, k)
        advantages = returns - returns.mean(-1, keepdim=True)
        if self.scale_std:
            advantages = advantages / (returns.std(-1, keepdim=True) + self.eps)  # §4.1.2
        return Advantages(per_token(advantages.flatten(), mask), per_token(returns.flatten(), mask))
