"""A judge that is an exported reward model (``lightning-pref export`` of a ``RewardModule`` checkpoint)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_pref.errors import UserInputError
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
        center: report ``r - reward_mean``: InstructGPT's normalization, under which the data's own responses (the
            reference completions the statistics were measured on) score 0 on average.
        device: where the model runs (``cpu``, ``cuda``, ``cuda:1``).
    """

    def __init__(self, path: str, batch_size: int = 8, normalize: bool = False, center: bool = False,
                 device: str = "cpu") -> None:
        # Imported here, not with the module: registering the judge (``lightning-pref judges``) needs none of it.
        from transformers import AutoTokenizer

        from lightning_pref.checks import check_range
        from lightning_pref.data.chat import ChatTemplate
        from lightning_pref.models import load_reward_model
        from lightning_pref.reward.module import RewardScorer

        check_range("judge.batch_size", batch_size, 1, integer=True)
        if normalize and center:  # normalizing already centers: one of them would be ignored
            raise UserInputError("judge.center: normalize already subtracts reward_mean (and divides by reward_std); "
                                 "set one of normalize and center")
        self.path, self.batch_size, self.normalize, self.center, self.device = path, batch_size, normalize, center, device
        model = load_reward_model(path, "judge.path")  # the model first: it says what a wrong directory is
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except OSError as err:
            raise UserInputError(f"judge.path: cannot load the tokenizer of {path!r} ({str(err).splitlines()[0]}); "
                                 "a reward model directory holds its tokenizer (lightning-pref export writes it)") from None
        self.scorer = RewardScorer(model.eval()).to(device)
        self.chat = ChatTemplate(self.tokenizer) if getattr(self.tokenizer, "chat_template", None) else None
        config = model.config
        self.stats = (getattr(config, "reward_mean", None), getattr(config, "reward_std", None))
        if (normalize or center) and None in self.stats:
            option = "normalize" if normalize else "center"
            raise UserInputError(f"judge.{option}: {path} has no reward_mean/reward_std in its config.json (a "
                                 "reward model exported after a validation has them)")

    def encode(self, prompt: Prompt, completion: str) -> tuple[list[int], list[int]]:
        """The ``(prompt ids, response ids)`` of a pair, as the data pipeline encodes them."""
        from lightning_pref.data.prompts import encode_completion  # on use, as in __init__

        return encode_completion(self.tokenizer, self.chat, prompt, completion)

    @torch.no_grad()
    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        sequences = [self.encode(p, c) for p, c in zip(prompts, completions, strict=True)]
        scores: list[float] = []
        for start in range(0, len(sequences), self.batch_size):
            ids, mask, _ = pad(sequences[start : start + self.batch_size], self.tokenizer.pad_token_id)
            scores += self.scorer(ids.to(self.device), mask.to(self.device)).tolist()
        mean, std = self.stats
        if self.normalize:
            scores = [(s - mean) / max(std, 1e-8) for s in scores]
        elif self.center:
            scores = [s - mean for s in scores]
        return scores
