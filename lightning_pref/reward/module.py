"""``RewardModule``: the Bradley–Terry stage of RLHF, a sibling of ``PreferenceModule`` on the same data.

A reward model :math:`r(x, y)` is a causal LM body with a scalar head (``AutoModelForSequenceClassification``
with one label), fitted to preference pairs so that :math:`\\Pr(y_c \\succ y_r \\mid x) = \\sigma(r(x, y_c) -
r(x, y_r))` (InstructGPT; the starting point of the DPO paper). Each sequence is scored at its **last real token,
found from the attention mask**: Hugging Face's sequence-classification models pick the last token whose id is
not the pad id, so with pad = EOS (SmolLM2, Qwen, Llama 3) they would score the token before the EOS.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from transformers import AutoModelForSequenceClassification

from lightning_pref import layout, packing
from lightning_pref.base_module import BaseModule
from lightning_pref.errors import UserInputError
from lightning_pref.metrics import ExactMeans, batch_means
from lightning_pref.models import CheckpointMethod, DtypeName, ModelSpec
from lightning_pref.registry import REWARD_LOSSES
from lightning_pref.reward.losses import BradleyTerryLoss, RewardLoss
from lightning_pref.reward.losses.base import checked_call
from lightning_pref.types import PackedRows, PreferenceBatch

#: Validation keys (prefixed ``val/``): exact means over the whole set on all devices. ``*_sq`` are the second
#: moments the standard deviations come from; they are not logged.
KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/ties", "rewards/margins",
        "rewards/chosen_sq", "rewards/rejected_sq")
_PROGRESS_BAR = ("train/loss", "train/rewards/accuracies")


def last_token(attention_mask: Tensor) -> Tensor:
    """Index of each row's last attended token (right or left padding alike). # (N, T) -> (N,)"""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


class RewardScorer(nn.Module):
    """A one-label sequence-classification model read at each row's last real token (see the module docstring).

    Being the module whose ``forward`` does the whole computation lets sharded strategies gather the parameters
    around it, head included.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.head = next((getattr(model, n) for n in ("score", "classifier") if isinstance(getattr(model, n, None), nn.Module)), None)
        if self.head is None:
            raise UserInputError(
                f"model.backbone: {type(model).__name__} has no scalar head (score or classifier) to read rewards from"
            )
        self.capability = packing.capability(model)  # which packed layouts it runs, decided once

    def runnable(self, packed: PackedRows) -> tuple[PackedRows | None, Any]:
        """The layout of ``packed`` this model runs and the masks it needs (:func:`packing.runnable`)."""
        return packing.runnable(self.model, packed, self.capability)

    def forward(self, input_ids: Tensor | None, attention_mask: Tensor | None, packed: PackedRows | None = None) -> Tensor:
        """Scores of ``prompt + response`` rows, or of the sequences in ``packed`` (in batch row order; padded
        again for a model that cannot take them). # (N, T) -> (N,)"""
        if packed is not None:
            usable, masks = packing.runnable(self.model, packed, self.capability)
            if usable is not None:
                hidden = self.model.base_model(**packing.body_inputs(usable, masks)).last_hidden_state  # (R, L, H)
                return self.head(hidden.flatten(0, 1)[layout.last_cells(usable)]).squeeze(-1).float()  # (N, H) -> (N,)
            input_ids, attention_mask, _ = layout.unpack(packed)
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = hidden.last_hidden_state  # (N, T, H)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.head(hidden[rows, last_token(attention_mask)]).squeeze(-1).float()  # (N, H) -> (N,)


class RewardModule(BaseModule):
    """A reward model trained on preference pairs with a pairwise loss plugin (Bradley–Terry by default).

    In YAML: ``model: {class_path: lightning_pref.RewardModule, init_args: {backbone: ..., loss: bradley_terry}}``
    (``configs/reward.yaml``); the data options are those of preference training (``data.*``), plus an optional
    ``margin`` column.

    Args:
        backbone: the model: a hub id or local directory (loaded with ``AutoModelForSequenceClassification``
            with one label: a causal LM checkpoint gets a new scalar head), or a dict of ``transformers`` config
            fields for a randomly initialized model.
        loss: a reward loss (``lightning-pref losses`` lists them), or its ``{class_path, init_args}`` spec.
        tokenizer: as ``PreferenceModule``'s (``None`` = the backbone's own; ``byte`` needs no files).
        optimizer: optimizer factory.
        scheduler: optional learning-rate scheduler factory (``WarmupDecay`` is told the run's length).
        dtype: parameter dtype; ``None`` = from ``trainer.precision`` (fp32 master weights under ``32-true`` and
            ``*-mixed``).
        model_kwargs: more ``from_pretrained`` arguments (``attn_implementation``, ``revision``, ...).
        disable_dropout: turn off the backbone's dropout.
        gradient_checkpointing: recompute decoder-layer activations in backward; ``true``: every layer's, an
            integer ``n``: every n-th layer's (as the policy modules' option).
        gradient_checkpointing_method: ``uniform`` (every n-th layer) or ``block`` (the bottom n), as the
            policy modules' option.
        on_nonfinite: a NaN/inf loss stops training (``error``) or skips that batch on every device (``skip``).
        init_seed: seed of a config-dict backbone's random initialization.
    """

    model_field = "model.backbone"
    plugin_registries = {"loss": REWARD_LOSSES}
    not_hparams = (*BaseModule.not_hparams, "loss")
    checkpointed_state = ("reward_stats",)

    def __init__(
        self,
        backbone: ModelSpec,
        loss: RewardLoss | None = None,
        tokenizer: str | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        dtype: DtypeName | None = None,
        model_kwargs: dict[str, Any] | None = None,
        disable_dropout: bool = True,
        gradient_checkpointing: bool | int = False,
        gradient_checkpointing_method: CheckpointMethod = "uniform",
        on_nonfinite: Literal["error", "skip"] = "error",
        init_seed: int = 0,
    ) -> None:
        super().__init__(backbone, tokenizer, model_kwargs, optimizer, scheduler)
        labels = (model_kwargs or {}).get("num_labels", 1)
        if labels != 1:  # a reward is one number: the head would be rebuilt with this many outputs, then squeezed
            raise UserInputError(f"model.model_kwargs: num_labels {labels!r}; a reward model has one label (one score "
                                 "per sequence), drop num_labels")
        self.loss = self.plugin(loss, REWARD_LOSSES, BradleyTerryLoss, "model.loss")
        self.scorer: RewardScorer | None = None
        # float64 sums: the standard deviations are differences of moments
        self.val_metrics, self.test_metrics = ExactMeans(KEYS, torch.float64), ExactMeans(KEYS, torch.float64)
        #: Mean and standard deviation of every validation score (chosen and rejected) at the last validation:
        #: saved in checkpoints and in the exported model, so a consumer can normalize rewards.
        self.reward_stats: dict[str, float] = {}

    def configure_model(self) -> None:
        if self.scorer is not None:
            return
        hp = self.hparams
        model = self.load_trained_model(hp.backbone, hp.model_kwargs, AutoModelForSequenceClassification, num_labels=1)
        if model.config.pad_token_id is None:  # its own forward (not ours) needs one; ours reads the mask
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.scorer = RewardScorer(model)
        if self._trainer is not None:
            rank_zero_info(self.describe_dtype("reward model", self.scorer))

    @property
    def layout_scorers(self) -> list[Any]:
        return [self.scorer] if self.scorer is not None else []

    def forward(self, batch: PreferenceBatch) -> tuple[Tensor, Tensor]:
        """Scores of the chosen and the rejected responses (one forward over both). # -> (B,), (B,)"""
        scores = self.scorer(batch.input_ids, batch.attention_mask, batch.packed)  # (2B,)
        return scores[: batch.num_chosen], scores[batch.num_chosen :]

    def _step(self, batch: PreferenceBatch, stage: str) -> tuple[Tensor, Tensor]:
        if not batch.paired:
            raise UserInputError(
                f"model.loss: a reward model learns from pairs, but the {stage} batch is unpaired; give paired data "
                "(prompt/chosen/rejected)"
            )
        chosen, rejected = self(batch)
        losses = checked_call(self.loss, chosen, rejected, batch.margins)  # (B,)
        weight = batch.weights[: batch.num_chosen] if batch.weights is not None else None
        c, r = chosen.detach().double(), rejected.detach().double()  # float64: variances from moments
        values = {
            "loss": (losses.detach(), weight), "rewards/chosen": (c, weight), "rewards/rejected": (r, weight),
            "rewards/accuracies": ((c > r).float(), weight), "rewards/ties": ((c == r).float(), weight),
            "rewards/margins": (c - r, weight), "rewards/chosen_sq": (c * c, weight),
            "rewards/rejected_sq": (r * r, weight),
        }
        batch_size = batch.num_chosen
        if stage == "train":
            means = batch_means(values)
            logged = {k: v for k, v in means.items() if not k.endswith("_sq")}
            logged["rewards/chosen_std"] = _std(means["rewards/chosen"], means["rewards/chosen_sq"])
            logged["rewards/rejected_std"] = _std(means["rewards/rejected"], means["rewards/rejected_sq"])
            self.log_metrics("train", logged, batch_size, _PROGRESS_BAR)
        else:
            metrics = getattr(self, f"{stage}_metrics")
            for key, metric in metrics.update(values).items():
                if not key.endswith("_sq"):
                    self.log(f"{stage}/{key}", metric, on_step=False, on_epoch=True, batch_size=batch_size)
        return losses.mean(), torch.cat([chosen, rejected])

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor:
        loss, scores = self._step(batch, "train")
        self.log_batch_cost(batch)
        return self.checked_loss(loss, scores, batch_idx)

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        self._step(batch, "test")

    def _epoch_stats(self, stage: str) -> None:
        """Standard deviations (exact over all devices, from the summed first and second moments), and the
        mean/std of every score, kept for export."""
        means = getattr(self, f"{stage}_metrics").means
        if means["rewards/chosen"].update_count == 0:
            return
        moments = {k: float(means[k].compute()) for k in ("rewards/chosen", "rewards/rejected", "rewards/chosen_sq",
                                                          "rewards/rejected_sq")}
        for key in ("rewards/chosen_sq", "rewards/rejected_sq"):  # not logged, so Lightning does not reset them
            means[key].reset()
        for side in ("chosen", "rejected"):
            std = _std(torch.tensor(moments[f"rewards/{side}"]), torch.tensor(moments[f"rewards/{side}_sq"]))
            self.log(f"{stage}/rewards/{side}_std", std)
        # equal numbers of chosen and rejected scores: the pooled moments are the means of the two
        mean = (moments["rewards/chosen"] + moments["rewards/rejected"]) / 2
        second = (moments["rewards/chosen_sq"] + moments["rewards/rejected_sq"]) / 2
        if stage == "val":
            self.reward_stats = {"mean": mean, "std": math.sqrt(max(second - mean * mean, 0.0)), "step": self.global_step}

    def on_validation_epoch_end(self) -> None:
        self._epoch_stats("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_stats("test")


def _std(mean: Tensor, second: Tensor) -> Tensor:
    return (second - mean * mean).clamp(min=0).sqrt()
