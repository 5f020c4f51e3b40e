"""A judge that is an exported reward model (``lightning-pref export`` of a ``RewardModule`` checkpoint)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from lightning_pref.errors import RowError, UserInputError
from lightning_pref.judges.base import Judge, Prompt
from lightning_pref.layout import pad
from lightning_pref.registry import register_judge


@register_judge("reward_model")
class RewardModelJudge(Judge):
    """Scores ``(prompt, completion)`` with a reward model, through its own tokenizer and chat template (which
    may differ from the policy's).

    Each pair is encoded exactly as reward training encoded its data: a message-list prompt with the chat
    template (the completion as the assistant's turn, ending at the template's end-of-turn), a text prompt as
    text with EOS after the completion; the score is read at the last real token.

    Args:
        path: a directory written by ``lightning-pref export`` from a reward checkpoint (or any one-label
            ``AutoModelForSequenceClassification`` directory with its tokenizer).
        batch_size: pairs per forward.
        normalize: report ``(r - reward_mean) / reward_std`` with the statistics saved at export.
        center: report ``r - bias``: InstructGPT's normalization, under which reference completions score 0 on
            average. The bias is the ``reward_mean`` saved at export (the mean over the responses of the reward
            model's validation data), or the mean over ``center_on``'s responses.
        center_on: a preference file (any format ``data.train`` reads) whose responses (chosen and rejected, or
            completions) the model scores once, at start, for the bias ``center`` subtracts: for reward models
            exported without statistics, or to center on the policy's own data.
        device: where the model runs (``cpu``, ``cuda``, ``cuda:1``).
    """

    def __init__(self, path: str, batch_size: int = 8, normalize: bool = False, center: bool = False,
                 center_on: str | None = None, device: str = "cpu") -> None:
        # Imported here, not with the module: registering the judge (``lightning-pref judges``) needs none of it.
        from lightning_pref.checks import check_range
        from lightning_pref.data.chat import ChatTemplate
        from lightning_pref.models import load_reward_model, read_tokenizer
        from lightning_pref.reward.module import RewardScorer

        check_range("judge.batch_size", batch_size, 1, integer=True)
        if normalize and center:  # normalizing already centers: one of them would be ignored
            raise UserInputError("judge.center: normalize already subtracts reward_mean (and divides by reward_std); "
                                 "set one of normalize and center")
        if center_on is not None and not center:  # the bias it measures would be ignored
            raise UserInputError("judge.center_on: it measures the bias that judge.center subtracts; set judge.center: "
                                 "true, or leave center_on out")
        self.path, self.batch_size, self.normalize, self.center, self.device = path, batch_size, normalize, center, device
        model = load_reward_model(path, "judge.path")  # the model first: it says what a wrong directory is
        self.tokenizer = read_tokenizer(path, "judge.path", "a reward model directory holds its tokenizer "
                                        "(lightning-pref export writes it)")
        try:
            self.scorer = RewardScorer(model.eval()).to(device)
        except (RuntimeError, AssertionError) as err:  # no such device here (torch's message names no option)
            why = str(err).strip().splitlines()[0]
            raise UserInputError(f"judge.device: cannot put the reward model on {device!r} ({why}); use cpu, or a "
                                 "device this machine has") from None
        self.chat = ChatTemplate(self.tokenizer) if getattr(self.tokenizer, "chat_template", None) else None
        config = model.config
        self.stats = (getattr(config, "reward_mean", None), getattr(config, "reward_std", None))
        self.center_on = center_on
        if center_on is not None:
            self.bias = self._mean_response_score(center_on)
            return
        self.bias = self.stats[0]
        if (normalize or center) and None in self.stats:
            option = "normalize" if normalize else "center"
            raise UserInputError(f"judge.{option}: {path} has no reward_mean/reward_std in its config.json (a "
                                 "reward model exported after a validation has them), or give judge.center_on: a "
                                 "file whose responses it scores at start")

    def encode(self, prompt: Prompt, completion: str) -> tuple[list[int], list[int]]:
        """The ``(prompt ids, response ids)`` of a pair, as the data pipeline encodes them."""
        from lightning_pref.data.prompts import encode_completion  # on use, as in __init__

        return encode_completion(self.tokenizer, self.chat, prompt, completion)

    def _mean_response_score(self, path: str) -> float:
        """The mean raw score of every response of the preference file ``path`` (one line says it)."""
        from lightning_pref.data.formats import detect, extract  # on use, as in __init__
        from lightning_pref.data.prepare import prompt_and_texts
        from lightning_pref.data.sources import read_source

        source = read_source(path, "judge.center_on")
        if not source.rows:
            raise UserInputError(f"judge.center_on: {path} has no rows")
        layout = detect(source.name, source.columns, source.rows[0], chat_template=self.chat is not None)
        prompts: list[Prompt] = []
        completions: list[str] = []
        for index, row in enumerate(source.rows):
            where = source.locate(index)
            try:  # the prompt as given (text or messages) and the raw responses, before any chat rendering
                _, prompt, responses = prompt_and_texts(self.tokenizer, None, layout, extract(row, layout, where), where)
            except RowError as err:
                raise UserInputError(f"judge.center_on: {err}") from None
            for response in responses:
                prompts.append(prompt)
                completions.append(response if isinstance(response, str) else response[-1]["content"])
        scores = self._raw_scores(prompts, completions)
        bias = sum(scores) / len(scores)
        print(f"judge.center_on: bias {bias:.4g}, the mean score of {len(scores)} responses of {path}", file=sys.stderr)
        return bias

    @torch.no_grad()
    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        scores = self._raw_scores(prompts, completions)
        mean, std = self.stats
        if self.normalize:
            scores = [(s - mean) / max(std, 1e-8) for s in scores]
        elif self.center:
            scores = [s - self.bias for s in scores]
        return scores

    @torch.no_grad()
    def _raw_scores(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        sequences = [self.encode(p, c) for p, c in zip(prompts, completions, strict=True)]
        scores: list[float] = []
        for start in range(0, len(sequences), self.batch_size):
            ids, mask, _ = pad(sequences[start : start + self.batch_size], self.tokenizer.pad_token_id)
            scores += self.scorer(ids.to(self.device), mask.to(self.device)).tolist()
        return scores
