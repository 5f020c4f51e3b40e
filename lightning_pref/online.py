"""On-policy preference optimization: the policy writes its own pairs, a judge labels them, any pairwise loss.

Offline DPO learns from pairs another model wrote. :class:`OnPolicyModule` makes them from the policy itself: for
each batch of prompts it samples ``k`` completions per prompt with the current policy (no gradients, eval mode,
left padding, seeded per step and rank, so an exact resume still holds), scores them with a judge (a Python
function, a rule, an exported reward model: ``lightning_pref.judges``), keeps the best and the worst completion
of each prompt as chosen and rejected (dropping ties and pairs closer than ``min_gap``, optionally penalizing
completions that never emitted EOS), turns them into exactly the batch the offline data pipeline builds for those
texts (:func:`~lightning_pref.data.prompts.encode_completion`, :class:`~lightning_pref.data.PreferenceCollator`,
laid out as the prompt batch says ``data.packing`` wants),
and trains with the same scorer and loss. The loss contract is untouched: every registered pairwise loss works
(DPO, cDPO, IPO, hinge, SimPO, yours); the reference stays at the initial model.

Two modes:

- ``online``: a new pair per prompt at every step (the training data is prompts).
- ``iterative``: rounds (the :class:`~lightning_pref.rounds.IterativeRounds` callback, added by the module). A round samples and labels
  ``round_prompts`` prompts once into ``round_<r>.jsonl`` in the run directory, and the next epoch trains on that
  file offline; the round index is the epoch and the round files are the callback's state (saved in
  checkpoints), so a killed run resumes in its round (``trainer.reload_dataloaders_every_n_epochs: 1``).

The sampling and judging is a :class:`~lightning_pref.rollout.Rollout`, the component reinforcement learning
shares.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import Callback
from torch import Tensor

from lightning_pref.checks import check_choice, check_range, refuse_unused
from lightning_pref.data.chat import ChatTemplate
from lightning_pref.data.collate import PreferenceCollator
from lightning_pref.data.prompts import encode_completion
from lightning_pref.data.tokenize import Encoded
from lightning_pref.errors import TrainingError, UserInputError
from lightning_pref.judges.base import Judge, check_scoring
from lightning_pref.models import ModelSpec
from lightning_pref.module import PreferenceModule
from lightning_pref.registry import JUDGES, LOSSES
from lightning_pref.rollout import Rollout, check_sampling_count, roll_out
from lightning_pref.rounds import IterativeRounds
from lightning_pref.types import PreferenceBatch, PromptBatch

_DEFAULT_ROUND_PROMPTS = 256


def pick_pairs(scores: Tensor, min_gap: float = 0.0) -> list[tuple[int, int, int]]:
    """``(prompt, best, worst)`` sample indices per prompt whose best and worst scores differ by more than
    ``min_gap`` (so ties are dropped). # (B, k) -> [(b, i, j)]"""
    pairs = []
    for b, row in enumerate(scores):
        best, worst = int(row.argmax()), int(row.argmin())
        if float(row[best] - row[worst]) > min_gap:
            pairs.append((b, best, worst))
    return pairs


class OnPolicyModule(PreferenceModule):
    """``PreferenceModule`` trained on pairs the policy generates and a judge labels (see the module docstring).

    In YAML: ``model: {class_path: lightning_pref.OnPolicyModule, init_args: {judge: no_shouting, ...}}``
    (``configs/online_dpo.yaml``); every ``PreferenceModule`` option applies, ``model.generation`` included
    (sampling must be on: ``do_sample: true``).

    Args:
        policy: the model to train (as ``PreferenceModule``'s).
        judge: scores the completions (a registered name, class name or import path, or an instance).
        samples_per_prompt: completions sampled per prompt (``k >= 2``).
        min_gap: drop a pair whose best and worst scores differ by this much or less (0: only ties).
        eos_penalty: subtracted from the score of a completion that never emitted a stop token (``None``: none).
        mode: ``online`` (new pairs every step) or ``iterative`` (rounds of ``round_prompts`` prompts written to
            JSONL and trained on offline).
        round_prompts: prompts sampled per round (``iterative``).
        **kwargs: ``PreferenceModule``'s other arguments.
    """

    plugin_registries = {"loss": LOSSES, "judge": JUDGES}
    not_hparams = (*PreferenceModule.not_hparams, "judge")

    def __init__(
        self,
        policy: ModelSpec,
        judge: Judge | None = None,
        samples_per_prompt: int = 4,
        min_gap: float = 0.0,
        eos_penalty: float | None = None,
        mode: Literal["online", "iterative"] = "online",
        round_prompts: int = _DEFAULT_ROUND_PROMPTS,
        **kwargs: Any,
    ) -> None:
        super().__init__(policy, **kwargs)
        self.judge = self.plugin(judge, JUDGES, None, "model.judge")
        check_scoring(self.judge, "model.judge", "a prompt's pair is its best- and worst-scored samples")
        self._rollouts = self._pairs_kept = 0  # this run's online steps and the pairs they kept (on_train_end)
        if samples_per_prompt < 2:
            raise UserInputError(f"model.samples_per_prompt: a pair needs >= 2 samples per prompt, got {samples_per_prompt}")
        if self.hparams.reference_mode == "precomputed":
            raise UserInputError("model.reference_mode: 'precomputed' cannot serve on-policy pairs (new every step); "
                                 "use reference_mode model or adapter")
        if self.loss.requires_kl_baseline or not self.loss.paired:
            raise UserInputError(f"model.loss: on-policy training makes pairs; {type(self.loss).__name__} is not a "
                                 "pairwise loss (use dpo, cdpo, ipo, hinge, simpo, ...)")
        check_choice("model.mode", mode, ("online", "iterative"))
        check_range("model.round_prompts", round_prompts, 1, integer=True)
        if mode == "online" and round_prompts != _DEFAULT_ROUND_PROMPTS:
            refuse_unused("model.round_prompts", round_prompts, "rounds are sampled only in mode iterative (online "
                          "mode samples new pairs every step); set model.mode: iterative, or drop round_prompts")
        # A negative gap kept identical completions as "pairs" (and reported no ties); NaN kept none at all.
        check_range("model.min_gap", min_gap, 0, hint="0 drops only exact ties")
        check_range("model.eos_penalty", eos_penalty, 0, hint="it is subtracted from the score of a completion that "
                    "never stopped (null: no penalty)")

    @property
    def train_data(self) -> str:
        """Training batches are prompts (``online``) or a round's pairs (``iterative``); linked to the data
        module."""
        return "prompts" if self.hparams.mode == "online" else "rounds"

    def on_fit_start(self) -> None:
        # Checked when training starts, not when built: evaluating a trained policy greedily is fine.
        if not self.generation.do_sample:
            raise UserInputError("model.generation.do_sample: on-policy pairs need sampling (greedy decoding gives "
                                 "the same completion every time); set it to true")
        check_sampling_count(self.generation)
        super().on_fit_start()
        self._rollouts = self._pairs_kept = 0

    def on_train_end(self) -> None:
        # A tie weighs 0 on its step; a whole run of them is a run that changed nothing, and says so.
        if not self._rollouts:
            return
        kept = torch.tensor(float(self._pairs_kept), device=self.device)
        if self.trainer.world_size > 1:
            kept = self.trainer.strategy.reduce(kept, reduce_op="sum")
        if kept == 0:
            gap = f" or differed by less than model.min_gap {self.hparams.min_gap}" if self.hparams.min_gap else ""
            raise TrainingError(f"model.judge: no step of this run kept a pair ({self._rollouts} rollouts: every "
                                f"prompt's samples scored the same{gap}), so the policy is unchanged; check that the "
                                "judge tells completions apart (train/judge/score, train/judge/ties in the logs)")

    def configure_callbacks(self) -> list[Callback]:
        """``iterative`` mode's rounds, as a callback whose state (the round files) is checkpointed."""
        return [IterativeRounds(self.hparams.round_prompts)] if self.hparams.mode == "iterative" else []

    # --------------------------------------------------------------------------------------------- sampling
    def _seed(self, first_prompt: int) -> int:
        """A seed per optimizer step, batch (its first prompt's index: accumulated batches differ) and rank; both
        come back on resume (the step from the checkpoint, the batch from the seeded data order), so a resumed
        run samples what the uninterrupted one did."""
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return self.generation.seed + 1_000_003 * self.global_step + 10_007 * first_prompt + 101 * rank

    def roll_out(self, prompts: list[list[int]], values: list[Any], seed: int) -> Rollout:
        """``samples_per_prompt`` completions of each prompt by the current policy, judged."""
        hp = self.hparams
        return roll_out(self.sampler, self.policy.lm, self.judge, prompts, values, hp.samples_per_prompt, seed,
                        hp.eos_penalty)

    def sample_pairs(self, prompts: list[list[int]], values: list[Any], seed: int) -> tuple[list[Encoded], dict]:
        """Sample, judge and pair: the offline pipeline's examples of the kept pairs, and the step's metrics.
        With no pair kept (every prompt's samples tied), the first prompt's best and worst samples come back as
        the only example and ``metrics["pairs"]`` is 0: train on it with weight 0.

        Args:
            prompts: prompt token ids (as the data pipeline encoded them).
            values: the prompts as the data gave them (what the judge sees).
            seed: seed of the sampling.
        """
        rollout = self.roll_out(prompts, values, seed)
        scores, texts = rollout.scores, rollout.completions.texts
        pairs = pick_pairs(scores, self.hparams.min_gap)
        kept = len(pairs)
        examples: list[Encoded] = []
        for b, best, worst in pairs or [(0, int(scores[0].argmax()), int(scores[0].argmin()))]:
            chosen = encode_completion(self.tokenizer, self.chat, values[b], texts[b][best], prompts[b])
            rejected = encode_completion(self.tokenizer, self.chat, values[b], texts[b][worst], prompts[b])
            # the fallback pair of a step where every prompt tied weighs 0: trained on with weight 0, and its loss
            # and accuracies are not reported as if something had been learnt
            examples.append(Encoded(chosen[0], chosen[1], rejected[1], index=b, weight=1.0 if kept else 0.0))
        if kept == 0 and examples[0].chosen == examples[0].rejected:  # a tie of identical texts: still a forward
            examples[0].rejected = [*examples[0].rejected, self.tokenizer.pad_token_id]
        metrics = rollout.metrics() | {"judge/ties": torch.tensor(1 - kept / len(prompts)),
                                       "pairs": torch.tensor(float(kept))}
        if kept:  # means over no pair are undefined: left out rather than NaN in the logs
            chosen_scores = torch.tensor([float(scores[b, i]) for b, i, _ in pairs])
            rejected_scores = torch.tensor([float(scores[b, j]) for b, _, j in pairs])
            metrics |= {"judge/chosen": chosen_scores.mean(), "judge/rejected": rejected_scores.mean(),
                        "judge/gap": (chosen_scores - rejected_scores).mean()}
        return examples, metrics

    def label(self, prompts: list[list[int]], values: list[Any], seed: int) -> list[dict[str, Any]]:
        """A round's records for a batch of prompts: ``{"prompt", "chosen", "rejected", "chosen_score",
        "rejected_score"}`` per kept pair (a preference file the offline pipeline reads)."""
        rollout = self.roll_out(prompts, values, seed)
        scores, texts = rollout.scores, rollout.completions.texts
        return [{"prompt": values[b], "chosen": texts[b][best], "rejected": texts[b][worst],
                 "chosen_score": float(scores[b, best]), "rejected_score": float(scores[b, worst])}
                for b, best, worst in pick_pairs(scores, self.hparams.min_gap)]

    @property
    def chat(self) -> ChatTemplate | None:
        """The policy tokenizer's chat template (``None`` without one): how a message prompt and a completion are
        encoded, as the data pipeline encodes them."""
        if getattr(self, "_chat", None) is None and getattr(self.tokenizer, "chat_template", None):
            self._chat = ChatTemplate(self.tokenizer)
        return getattr(self, "_chat", None)

    # --------------------------------------------------------------------------------------------- training
    def training_step(self, batch: PreferenceBatch | PromptBatch, batch_idx: int) -> Tensor:
        if not isinstance(batch, PromptBatch):  # iterative: a round's pairs, trained on offline
            return super().training_step(batch, batch_idx)
        prompts = batch.token_ids()
        examples, metrics = self.sample_pairs(prompts, batch.prompts, self._seed(int(batch.index[0])))
        self._rollouts, self._pairs_kept = self._rollouts + 1, self._pairs_kept + int(metrics["pairs"])
        pairs = PreferenceCollator(self.tokenizer.pad_token_id, packing=batch.packing)(examples)
        self.runnable_layout(pairs)
        pairs = self.transfer_batch_to_device(pairs, self.device, 0)
        self.log_metrics("train", metrics, len(prompts), ("train/judge/score",))
        # No pair kept: the fallback pair trains with weight 0, so every device still runs the same forward and
        # backward (collectives under DDP/FSDP) and nothing is learnt from a tie.
        loss = super().training_step(pairs, batch_idx)
        return loss * 0.0 if metrics["pairs"] == 0 else loss
