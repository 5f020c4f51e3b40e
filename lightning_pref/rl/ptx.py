r"""PPO-ptx: pretraining (or SFT) log-likelihood mixed into the RL loss, so the policy does not forget.

InstructGPT's final objective (Ouyang et al. 2022, arXiv:2203.02155, Eq. 2) adds
:math:`\gamma\, \mathbb{E}_{x \sim D_{pretrain}}[\log \pi_\theta(x)]`; as a loss, :math:`\gamma` times the mean
negative log-likelihood per token of a batch of that text at every update. The batch of update :math:`u` is the
:math:`u`-th slice of a seeded permutation of the rows (cycling), so a resumed run sees the batches the
uninterrupted one did without any state of its own.

Rows are read as training data is (``.jsonl``, ``.parquet``, a ``save_to_disk`` directory, ...) and are either
plain text (a ``text`` column: every token after the first is scored) or SFT records (``prompt`` and
``completion``, or ``messages`` whose last turn is the assistant's: only the completion is scored, encoded as
the data pipeline encodes a response).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lightning_pref.data.chat import ChatTemplate
from lightning_pref.data.prompts import encode_completion
from lightning_pref.data.sources import read_source
from lightning_pref.data.tokenize import encode_prompt
from lightning_pref.errors import UserInputError
from lightning_pref.layout import Sequence, pad
from lightning_pref.logps import SequenceScorer


@dataclass
class PtxOptions:
    r"""``model.ptx``: PPO-ptx.

    Attributes:
        data: the text: a file or dataset of ``text`` rows, or SFT rows (``prompt``/``completion`` or ``messages``).
        coef: :math:`\gamma > 0`, the weight of the negative log-likelihood.
        batch_size: rows per update.
        max_length: tokens kept of each row (its start).
    """

    data: str
    coef: float = 0.1
    batch_size: int = 4
    max_length: int = 512

    def __post_init__(self) -> None:
        if not 0 < self.coef < float("inf") or self.batch_size < 1 or self.max_length < 2:
            raise UserInputError(f"model.ptx: coef must be > 0, batch_size >= 1 and max_length >= 2, got {self.coef}, "
                                 f"{self.batch_size}, {self.max_length}")


class PtxData:
    """The ptx rows, tokenized once, and the batch each update trains on.

    Args:
        options: the ptx options.
        tokenizer: the policy's tokenizer.
        seed: seed of the permutation.
    """

    def __init__(self, options: PtxOptions, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> None:
        self.options, self.tokenizer = options, tokenizer
        source = read_source(options.data, "model.ptx.data")
        chat = ChatTemplate(tokenizer) if getattr(tokenizer, "chat_template", None) else None
        self.rows: list[Sequence] = []
        for i, row in enumerate(source.rows):
            self.rows.append(self._encode(row, chat, source.locate(i)))
        if not self.rows:
            raise UserInputError(f"model.ptx.data: {options.data} has no rows")
        self.order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(seed)).tolist()

    def _encode(self, row: dict, chat: ChatTemplate | None, where: str) -> Sequence:
        limit = self.options.max_length
        if isinstance(row.get("text"), str) and row["text"]:
            ids = encode_prompt(self.tokenizer, row["text"])[:limit]
            return ids[:1], ids[1:]  # every token after the first is scored
        if "messages" in row and isinstance(row["messages"], list) and row["messages"]:
            *prompt, last = row["messages"]
            if not isinstance(last, dict) or last.get("role") != "assistant":
                raise UserInputError(f"model.ptx.data: {where}: the last message must be the assistant's turn")
            prompt_ids, response = encode_completion(self.tokenizer, chat, prompt, str(last.get("content", "")))
        elif isinstance(row.get("prompt"), str | list) and isinstance(row.get("completion"), str):
            prompt_ids, response = encode_completion(self.tokenizer, chat, row["prompt"], row["completion"])
        else:
            raise UserInputError(f"model.ptx.data: {where}: expected a non-empty 'text' string, or 'prompt' and "
                                 "'completion', or 'messages' ending with the assistant's turn")
        keep = max(1, limit - len(response))
        return prompt_ids[-keep:], response[: limit - 1]

    def batch(self, update: int) -> list[Sequence]:
        """The rows of update ``update`` (the permutation's ``update``-th slice, cycling)."""
        size = self.options.batch_size
        return [self.rows[self.order[(update * size + i) % len(self.rows)]] for i in range(size)]

    def loss(self, policy: SequenceScorer, update: int, device: torch.device) -> Tensor:
        """Mean negative log-likelihood per scored token of update ``update``'s batch."""
        ids, attention, response = (t.to(device) for t in pad(self.batch(update), self.tokenizer.pad_token_id))
        logps, tokens, _ = policy(ids, attention, response)
        return -logps.sum() / tokens.sum().clamp(min=1)
