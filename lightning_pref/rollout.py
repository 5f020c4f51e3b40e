"""Rollouts: ``k`` completions of each prompt sampled from the current policy and judged.

The data of every on-policy method here: on-policy DPO makes pairs of a rollout's best and worst completions
(:mod:`lightning_pref.online`), reinforcement learning turns its scores into rewards and advantages. A rollout is
sampled with the policy in eval mode, without gradients, from left-padded prompts, stopping at EOS or the chat
template's end-of-turn (:class:`~lightning_pref.generation.Sampler`), and seeded by the caller per step, batch and
rank, so an exact resume samples what the uninterrupted run did. The judge's scores are checked where they enter
(:func:`~lightning_pref.judges.base.judge_scores`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_pref.checks import refuse_unused
from lightning_pref.generation import Completions, GenerationOptions, Sampler
from lightning_pref.judges.base import Judge, judge_scores


@dataclass
class Rollout:
    """``B`` prompts, ``k`` sampled completions each (prompt-major), and their scores.

    Attributes:
        prompts: the prompts' token ids. # [B]
        values: the prompts as the data gave them (what the judge saw). # [B]
        completions: the completions. # B * k
        scores: the judge's score of each completion, minus ``eos_penalty`` where one never emitted a stop
            token. # (B, k)
        seconds: wall time of the sampling.
    """

    prompts: list[list[int]]
    values: list[Any]
    completions: Completions
    scores: Tensor
    seconds: float

    @property
    def k(self) -> int:
        return self.scores.shape[1]

    def metrics(self) -> dict[str, Tensor]:
        """What every on-policy method logs about its rollouts (keys without the ``train/`` prefix)."""
        lengths = self.completions.lengths.float().cpu()
        return {
            "judge/score": self.scores.mean(),
            "completions/eos_rate": self.completions.eos.float().mean().cpu(),
            "completions/tokens": lengths.mean(),
            "generation/tokens_per_s": torch.tensor(float(lengths.sum()) / max(self.seconds, 1e-9)),
            "generation/seconds": torch.tensor(self.seconds),
        }


def check_sampling_count(generation: GenerationOptions) -> None:
    """Training rollouts sample ``model.samples_per_prompt`` completions per prompt, so a
    ``generation.num_return_sequences`` other than 1 would be ignored while training (``predict`` and
    ``evaluate`` of the same module honour it): refused when training starts."""
    if generation.num_return_sequences != 1:
        refuse_unused("model.generation.num_return_sequences", generation.num_return_sequences, "training samples "
                      "model.samples_per_prompt completions per prompt; set samples_per_prompt instead")


def roll_out(
    sampler: Sampler, model: nn.Module, judge: Judge, prompts: list[list[int]], values: list[Any], k: int, seed: int,
    eos_penalty: float | None = None, logps: bool = False,
) -> Rollout:
    """Sample ``k`` completions of each prompt with ``model`` and judge them.

    Args:
        sampler: how to sample (tokenizer, options, stop tokens).
        model: the policy's ``transformers`` model.
        judge: scores each completion (checked: one finite number each).
        prompts: prompt token ids, as the data pipeline encoded them. # [B]
        values: the prompts as the data gave them. # [B]
        k: completions per prompt.
        seed: seed of the sampling.
        eos_penalty: subtracted from the score of a completion that never emitted a stop token (``None``: none).
        logps: keep each sampled token's log-probability at the sampling temperature (``completions.logps``).
    """
    start = time.perf_counter()
    completions = sampler(model, prompts, seed, k, logps)
    seconds = time.perf_counter() - start
    texts = [t for per_prompt in completions.texts for t in per_prompt]  # (B * k,) prompt-major
    scores = torch.tensor(judge_scores(judge, [v for v in values for _ in range(k)], texts), dtype=torch.float32)
    if eos_penalty is not None:
        scores = scores - eos_penalty * (~completions.eos.cpu()).float()
    return Rollout(prompts, values, completions, scores.view(len(prompts), k), seconds)
