"""Weighted sum of registered losses, e.g. RPO = DPO + NLL."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lightning_pref.errors import UserInputError
from lightning_pref.losses.base import PreferenceLoss
from lightning_pref.registry import get_loss, register_loss
from lightning_pref.types import LossOutput, SequenceLogps

#: RPO (Pang et al. 2024): DPO plus the chosen responses' per-token NLL.
RPO_TERMS: dict[str, float] = {"dpo": 1.0, "nll": 1.0}


@register_loss("weighted")
class WeightedLoss(PreferenceLoss):
    r"""Composition of registered losses, :math:`\mathcal{L} = \sum_k w_k \mathcal{L}_k`, per example.

    The default is RPO, Pang et al. 2024, "Iterative Reasoning Preference Optimization":
    :math:`\mathcal{L}_{DPO} + \alpha \mathcal{L}_{NLL}` with :math:`\alpha = 1`. From YAML::

        loss:
          class_path: lightning_pref.losses.WeightedLoss
          init_args: {terms: {dpo: 1.0, nll: 0.2}, term_args: {dpo: {beta: 0.05}}}

    Each term is built with ``get_loss(name, **term_args.get(name, {}))``. What the composition needs is derived
    from its terms and stored as *instance* attributes that shadow the class attributes: it
    ``requires_reference`` / ``requires_kl_baseline`` if any term does, and is ``paired`` if any term is.
    ``reference`` and ``kl_baseline`` are passed to every term. Rewards and ``beta`` are those of the first term
    (``beta`` only if it has one); metrics hold each term's mean loss as ``loss_<name>`` plus the terms' own
    metrics. All terms must give per-example losses of the same shape (``dpo`` and ``nll`` give ``(B,)`` on
    paired batches; ``kto`` and ``nll`` do not match).

    Args:
        terms: loss name to weight :math:`w_k`, in order; the first term provides rewards and ``beta``.
        term_args: constructor arguments per term name.
    """

    paper = "Pang et al. 2024, arXiv:2404.19733 (RPO: DPO + NLL, the default); any weighted sum of losses"

    def __init__(
        self, terms: dict[str, float] = RPO_TERMS, term_args: dict[str, dict[str, Any]] | None = None
    ) -> None:
        super().__init__()
        term_args = term_args or {}
        if not terms:
            raise ValueError("weighted: terms must name at least one loss, e.g. {'dpo': 1.0, 'nll': 1.0}")
        if unknown := sorted(set(term_args) - set(terms)):
            raise ValueError(f"weighted: term_args names {unknown}, which are not in terms {sorted(terms)}")
        if bad := {name: w for name, w in terms.items() if not 0 <= w < float("inf")}:  # NaN fails both
            raise ValueError(f"weighted: weights must be finite and >= 0 (a negative one maximises its loss), got {bad}")
        if not any(terms.values()):
            raise ValueError(f"weighted: every weight is 0, so the loss is 0 and nothing is learnt; got {dict(terms)}")
        self.weights = dict(terms)  # a copy: the default mapping is shared between instances
        self.terms = nn.ModuleDict({name: get_loss(name, **term_args.get(name, {})) for name in terms})
        losses = list(self.terms.values())
        self.requires_reference = any(loss.requires_reference for loss in losses)
        self.paired = any(loss.paired for loss in losses)
        self.requires_kl_baseline = any(loss.requires_kl_baseline for loss in losses)
        if hasattr(losses[0], "beta"):
            self.beta = losses[0].beta

    def forward(
        self, policy: SequenceLogps, reference: SequenceLogps | None, *, kl_baseline: Tensor | None = None
    ) -> LossOutput:
        outputs = {
            name: term(policy, reference, kl_baseline=kl_baseline) for name, term in self.terms.items()
        }
        shapes = {name: tuple(out.losses.shape) for name, out in outputs.items()}
        if len(set(shapes.values())) > 1:
            raise UserInputError(  # known only once a batch is scored: one line, not a traceback from the step
                f"model.loss: weighted: terms give per-example losses of different shapes {shapes}; only terms that "
                "score the same examples can be summed (e.g. paired losses with nll, not kto with nll)"
            )
        losses = sum(self.weights[name] * out.losses for name, out in outputs.items())
        metrics: dict[str, Tensor] = {}
        for name, out in outputs.items():
            metrics[f"loss_{name}"] = out.losses.detach().mean()
            metrics.update(out.metrics)
        first = next(iter(outputs.values()))
        return LossOutput(
            losses=losses,
            chosen_rewards=first.chosen_rewards,
            rejected_rewards=first.rejected_rewards,
            metrics=metrics,
        )
