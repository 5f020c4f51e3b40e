r"""The critic of PPO: :math:`V(s_t)`, the expected return before each completion token, from a one-label
sequence-classification model (a causal LM body and a scalar head).

InstructGPT initialized the value function from the reward model (Ouyang et al. 2022, §3.5); so does
``critic.model`` pointing at an exported reward model (``lightning-pref export`` of a ``RewardModule`` checkpoint,
or any one-label ``AutoModelForSequenceClassification`` directory): at step 0 its value at a completion's last
token is that reward model's score. Without ``critic.model`` the critic is the policy's own body with a
zero-initialized head (every value starts at 0).

The value of token ``t`` is read from the hidden state of the position *before* it (the state in which the token
is chosen), the same positions that predict the token in the policy's log-probs, padded or packed alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from lightning_pref import layout, packing
from lightning_pref.checks import check_range
from lightning_pref.reward.module import RewardScorer
from lightning_pref.types import PackedRows


@dataclass
class CriticOptions:
    """``model.critic``: the value model of PPO (``estimator: gae``).

    Attributes:
        model: a reward model directory to initialize the critic from (InstructGPT); ``None`` = the policy's body
            with a zero-initialized head. It must use the policy's tokenizer (it reads the policy's tokens).
        lr: the critic's learning rate; ``None`` = the policy's.
        vf_coef: weight of the value loss next to the policy loss.
        value_clip: clip the critic's move around its rollout values (``None``: no clipping).
    """

    model: str | None = None
    lr: float | None = None
    vf_coef: float = 0.1
    value_clip: float | None = 0.2

    def __post_init__(self) -> None:
        check_range("model.critic.vf_coef", self.vf_coef, 0)  # NaN-safe range checks
        check_range("model.critic.lr", self.lr, 0, low_open=True, hint="null: the policy's learning rate")
        check_range("model.critic.value_clip", self.value_clip, 0, low_open=True, hint="null: no clipping")


class ValueScorer(RewardScorer):
    """A one-label sequence-classification model read at every scored position (see the module docstring); as a
    :class:`RewardScorer` (its ``forward``) it reads each row's last token, which is the reward model's score."""

    def values(self, input_ids: Tensor | None, attention_mask: Tensor | None, response_mask: Tensor | None,
               packed: PackedRows | None = None) -> tuple[Tensor, Tensor]:
        """:math:`V(s_t)` before every response token, flat in the order the policy's scorer gives its per-token
        log-probs, and the batch row of each. # -> (S,), (S,)"""
        if packed is not None:
            usable, masks = packing.runnable(self.model, packed, self.capability)
            if usable is not None:
                hidden = self.model.base_model(**packing.body_inputs(usable, masks)).last_hidden_state  # (R, L, H)
                _, predictors, sequences = layout.scored_tokens(usable)
                return self.head(hidden.flatten(0, 1)[predictors]).squeeze(-1).float(), sequences  # (S,)
            input_ids, attention_mask, response_mask = layout.unpack(packed)
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        target_mask = response_mask[:, 1:].bool()  # (N, T-1) token t + 1 is valued from position t
        values = self.head(hidden.last_hidden_state[:, :-1][target_mask]).squeeze(-1).float()  # (S,)
        return values, target_mask.nonzero()[:, 0]
