"""On-policy preference optimization: the policy writes its own pairs, a judge labels them, any pairwise loss.

Offline DPO learns from pairs another model wrote. :class:`OnPolicyModule` makes them from the policy itself: for
each batch of prompts it samples ``k`` completions per prompt with the current policy (no gradients, eval mode,
left padding, seeded per step and rank, so an exact resume still holds), scores them with a judge (a Python
function, a rule, an exported reward model: ``lightning_pref.judges``), keeps the best and the worst completion
of each prompt as chosen and rejected (dropping ties and pairs closer than ``min_gap``, optionally penalizing
completions that never emitted EOS), turns them into exactly the batch the offline data pipeline builds for those
texts (:func:`~lightning_pref.data.prompts.encode_completion`, :class:`~lightning_pref.data.PreferenceCollator`),
and trains with the same scorer and loss. The loss contract is untouched: every registered pairwise loss works
(DPO, cDPO, IPO, hinge, SimPO, yours); the reference stays at the initial model.

Two modes:

- ``online``: a new pair per prompt at every step (the training data is prompts).
- ``iterative``: rounds. A round samples and labels ``round_prompts`` prompts once into ``round_<r>.jsonl`` in the
  run directory, and the next epoch trains on that file offline; the round index is the epoch (saved in
  checkpoints), so a killed run resumes in its round (``trainer.reload_dataloaders_every_n_epochs: 1``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_pref.data.chat import ChatTemplate
from lightning_pref.data.collate import PreferenceCollator
from lightning_pref.data.prompts import encode_completion
from lightning_pref.data.tokenize import Encoded
from lightning_pref.errors import UserInputError
from lightning_pref.generation import Completions
from lightning_pref.judges.base import Judge
from lightning_pref.models import ModelSpec
from lightning_pref.module import PreferenceModule
from lightning_pref.predict import write_jsonl
from lightning_pref.registry import JUDGES, LOSSES
from lightning_pref.types import PreferenceBatch, PromptBatch


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
    checkpointed_state = ("round_files",)

    def __init__(
        self,
        policy: ModelSpec,
        judge: Judge | None = None,
        samples_per_prompt: int = 4,
        min_gap: float = 0.0,
        eos_penalty: float | None = None,
        mode: Literal["online", "iterative"] = "online",
        round_prompts: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(policy, **kwargs)
        if isinstance(judge, dict):  # as checkpoints keep it
            judge = JUDGES.from_spec(judge)
        if judge is None:
            raise UserInputError("model.judge: required, e.g. no_shouting or {class_path: function, init_args: {fn: ...}}")
        if samples_per_prompt < 2:
            raise UserInputError(f"model.samples_per_prompt: a pair needs >= 2 samples per prompt, got {samples_per_prompt}")
        if not self.generation.do_sample:
            raise UserInputError("model.generation.do_sample: on-policy pairs need sampling (greedy decoding gives "
                                 "the same completion every time); set it to true")
        if self.hparams.reference_mode == "precomputed":
            raise UserInputError("model.reference_mode: 'precomputed' cannot serve on-policy pairs (new every step); "
                                 "use reference_mode model or adapter")
        if self.loss.requires_kl_baseline or not self.loss.paired:
            raise UserInputError(f"model.loss: on-policy training makes pairs; {type(self.loss).__name__} is not a "
                                 "pairwise loss (use dpo, cdpo, ipo, hinge, simpo, ...)")
        if round_prompts < 1:
            raise UserInputError(f"model.round_prompts: must be >= 1, got {round_prompts}")
        self.judge = judge
        self.hparams.update(judge=judge.spec, samples_per_prompt=samples_per_prompt, min_gap=min_gap,
                            eos_penalty=eos_penalty, mode=mode, round_prompts=round_prompts)
        self.round_files: dict[int, str] = {}  # iterative: round -> its JSONL (kept in checkpoints)

    @property
    def train_data(self) -> str:
        """Training batches are prompts (``online``) or a round's pairs (``iterative``); linked to the data
        module."""
        return "prompts" if self.hparams.mode == "online" else "rounds"

    # --------------------------------------------------------------------------------------------- sampling
    def _seed(self, first_prompt: int) -> int:
        """A seed per optimizer step, batch (its first prompt's index: accumulated batches differ) and rank; both
        come back on resume (the step from the checkpoint, the batch from the seeded data order), so a resumed
        run samples what the uninterrupted one did."""
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return self.generation.seed + 1_000_003 * self.global_step + 10_007 * first_prompt + 101 * rank

    def sample_pairs(self, prompts: list[list[int]], values: list[Any], seed: int) -> tuple[list[Encoded], dict]:
        """Sample, judge and pair: the offline pipeline's examples of the kept pairs, and the step's metrics.
        With no pair kept (every prompt's samples tied), the first prompt's best and worst samples come back as
        the only example and ``metrics["pairs"]`` is 0: train on it with weight 0.

        Args:
            prompts: prompt token ids (as the data pipeline encoded them).
            values: the prompts as the data gave them (what the judge sees).
            seed: seed of the sampling.
        """
        start = time.perf_counter()
        completions = self.complete_samples(prompts, self.hparams.samples_per_prompt, seed)
        seconds = time.perf_counter() - start
        scores = self.judged(values, completions)
        pairs = pick_pairs(scores, self.hparams.min_gap)
        kept = len(pairs)
        examples: list[Encoded] = []
        for b, best, worst in pairs or [(0, int(scores[0].argmax()), int(scores[0].argmin()))]:
            chosen = encode_completion(self.tokenizer, self.chat, values[b], completions.texts[b][best], prompts[b])
            rejected = encode_completion(self.tokenizer, self.chat, values[b], completions.texts[b][worst], prompts[b])
            examples.append(Encoded(chosen[0], chosen[1], rejected[1], index=b))
        if kept == 0 and examples[0].chosen == examples[0].rejected:  # a tie of identical texts: still a forward
            examples[0].rejected = [*examples[0].rejected, self.tokenizer.pad_token_id]
        pairs = pairs[:kept]
        lengths = completions.lengths.float()
        chosen_scores = torch.tensor([float(scores[b, i]) for b, i, _ in pairs]) if pairs else torch.zeros(0)
        rejected_scores = torch.tensor([float(scores[b, j]) for b, _, j in pairs]) if pairs else torch.zeros(0)
        metrics = {
            "judge/score": scores.mean(), "judge/chosen": _mean(chosen_scores), "judge/rejected": _mean(rejected_scores),
            "judge/gap": _mean(chosen_scores - rejected_scores), "judge/ties": torch.tensor(1 - len(pairs) / len(prompts)),
            "completions/eos_rate": completions.eos.float().mean().cpu(), "completions/tokens": lengths.mean().cpu(),
            "generation/tokens_per_s": torch.tensor(float(lengths.sum()) / max(seconds, 1e-9)),
            "generation/seconds": torch.tensor(seconds), "pairs": torch.tensor(float(kept)),
        }
        if not kept:  # no pair: means over none are undefined, not NaN in the logs
            for key in ("judge/chosen", "judge/rejected", "judge/gap"):
                del metrics[key]
        return examples, metrics

    def judged(self, values: list[Any], completions: Completions) -> Tensor:
        """The judge's score of each prompt's ``k`` completions, minus ``eos_penalty`` where one never emitted a
        stop token. # -> (B, k)"""
        k = self.hparams.samples_per_prompt
        texts = [t for per_prompt in completions.texts for t in per_prompt]  # (B * k,) prompt-major
        scores = torch.tensor(self.judge.score([v for v in values for _ in range(k)], texts), dtype=torch.float32)
        if self.hparams.eos_penalty is not None:
            scores = scores - self.hparams.eos_penalty * (~completions.eos.cpu()).float()
        return scores.view(len(values), k)

    def complete_samples(self, prompts: list[list[int]], k: int, seed: int) -> Completions:
        """``k`` sampled completions per prompt by the current policy (no reference)."""
        saved = self.generation.num_return_sequences
        self.generation.num_return_sequences = k
        try:
            return self.complete(prompts, seed, with_reference=False)[0]
        finally:
            self.generation.num_return_sequences = saved

    @property
    def packing(self) -> bool | str:
        """The data module's ``data.packing``, so generated pairs are laid out as offline batches are."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(datamodule, "hparams", {}).get("packing", False)

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
        prompts = [row[mask.bool()].tolist() for row, mask in zip(batch.input_ids, batch.attention_mask, strict=True)]
        examples, metrics = self.sample_pairs(prompts, batch.prompts, self._seed(int(batch.index[0])))
        collate = PreferenceCollator(self.tokenizer.pad_token_id, packing=self.packing)
        pairs = self.transfer_batch_to_device(collate(examples), self.device, 0)
        score = metrics.pop("judge/score")
        self.log("train/judge/score", score, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(prompts))
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, on_step=True, on_epoch=False,
                      batch_size=len(prompts))
        # No pair kept: the fallback pair trains with weight 0, so every device still runs the same forward and
        # backward (collectives under DDP/FSDP) and nothing is learnt from a tie.
        loss = super().training_step(pairs, batch_idx)
        return loss * 0.0 if metrics["pairs"] == 0 else loss

    # -------------------------------------------------------------------------------------------- iterative
    def write_round(self, round_index: int, prompts: list[Any], directory: Path) -> Path:
        """Sample and label round ``round_index``'s prompts (``(ids, value)`` pairs) into a preference JSONL of
        ``{"prompt", "chosen", "rejected", "chosen_score", "rejected_score"}`` records; every rank samples its
        share, rank 0 writes. Returns the file."""
        from lightning_pref.predict import all_gather_objects

        trainer = self.trainer
        mine = prompts[trainer.global_rank :: trainer.world_size]
        records = []
        batch_size = trainer.datamodule.hparams.batch_size
        for start in range(0, len(mine), batch_size):
            part = mine[start : start + batch_size]
            ids, values = [p[0] for p in part], [p[1] for p in part]
            seed = self.generation.seed + 1_000_003 * round_index + 10_007 * start + 101 * trainer.global_rank
            completions = self.complete_samples(ids, self.hparams.samples_per_prompt, seed)
            scores = self.judged(values, completions)
            for b, best, worst in pick_pairs(scores, self.hparams.min_gap):
                records.append({"prompt": values[b], "chosen": completions.texts[b][best],
                                "rejected": completions.texts[b][worst], "chosen_score": float(scores[b, best]),
                                "rejected_score": float(scores[b, worst])})
        records = all_gather_objects(trainer, records)
        path = directory / f"round_{round_index}.jsonl"
        if trainer.is_global_zero:
            if not records:
                raise UserInputError(f"model.min_gap: round {round_index} kept no pair (every prompt's samples "
                                     "tied); lower model.min_gap or sample more per prompt")
            write_jsonl(path, records)
        trainer.strategy.barrier()
        return path

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.hparams.mode == "iterative":
            if not self.trainer.reload_dataloaders_every_n_epochs:
                raise UserInputError("model.mode: iterative trains each round's file in its own epoch; set "
                                     "trainer.reload_dataloaders_every_n_epochs: 1")
            self._prepare_round(self.current_epoch)

    def on_train_epoch_end(self) -> None:
        if self.hparams.mode == "iterative":
            self._prepare_round(self.current_epoch + 1)

    def _prepare_round(self, round_index: int) -> None:
        """The file of round ``round_index`` (this run's or, resuming, the interrupted run's), and the data module
        pointed at it for the next training dataloader."""
        datamodule = self.trainer.datamodule
        path = self.round_files.get(round_index)
        if path is None or not Path(path).is_file():
            n, prompts = self.hparams.round_prompts, datamodule.train_prompts
            shard = [prompts[(round_index * n + i) % len(prompts)] for i in range(n)]
            directory = Path(self.trainer.log_dir or self.trainer.default_root_dir)
            path = str(self.write_round(round_index, [(p.ids, p.prompt) for p in shard], directory))
            self.round_files[round_index] = path
        datamodule.train_from(path)


def _mean(values: Tensor) -> Tensor:
    return values.mean() if values.numel() else torch.tensor(float("nan"))
