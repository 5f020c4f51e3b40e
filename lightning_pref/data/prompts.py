"""Prompt-only data, for generation (``predict``, ``evaluate``) and on-policy training: the prompts of any file.

A row gives its prompt as

- ``prompt``: a string, or a list of ``{"role", "content"}`` messages (rendered with the chat template and its
  generation prompt); ShareGPT messages and single message objects are read as for preference data;
- ``messages``: a conversation to continue (a final assistant turn, if there is one, is left out: that is the
  turn to generate);
- any preference format (standard, conversational, implicit prompt, HH transcripts, unpaired): its prompt.

The prompt is encoded as preference data encodes it (the same BOS handling, the same chat rendering), so a
completion continues exactly the context the policy was trained to answer, and cut as the data options say
(``max_prompt_length``, else ``max_length``), keeping the template's header and the prompt's end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from transformers import PreTrainedTokenizerBase

from lightning_pref.data.chat import ChatTemplate, require_template
from lightning_pref.data.formats import FIELDS, Layout, detect, extract, is_messages
from lightning_pref.data.prepare import SHOW_DROPPED, Options, prompt_and_texts, report_invalid
from lightning_pref.data.sources import Source
from lightning_pref.data.stats import SplitStats
from lightning_pref.data.tokenize import encode_prompt, encode_response, truncate
from lightning_pref.errors import RowError, UserInputError
from lightning_pref.layout import left_pad
from lightning_pref.types import PromptBatch


@dataclass
class PromptExample:
    """One prompt: its token ids, the prompt as the data gave it (for the output) and its row index."""

    ids: list[int]
    prompt: Any  # a string, or a list of messages
    index: int
    weight: float = 1.0  # 0 for a duplicate padded in by a distributed sampler: written once, by its owner


def prepare_prompts(
    source: Source, tokenizer: PreTrainedTokenizerBase, options: Options, field: str,
    indices: Sequence[int] | None = None,
) -> tuple[list[PromptExample], SplitStats]:
    """Encode the prompt of every row of ``source`` (or of the rows ``indices``), in file order (see the module
    docstring), and count them (rows dropped by ``data.on_invalid: drop``, printed with the first errors as for
    pairs; prompts cut to ``data.max_length`` / ``data.max_prompt_length``, printed with how many).

    Raises:
        UserInputError: a row without a usable prompt (naming file, line and field; ``data.on_invalid: drop``
            skips it), a source without a prompt column or preference fields, or no prompt left.
    """
    chat_template = bool(getattr(tokenizer, "chat_template", None))
    columns = set(source.columns)
    mapped = dict(options.columns)
    prompt_column, messages_column = mapped.get("prompt", "prompt"), mapped.get("messages", "messages")
    preference = any(set(mapped.get(k, k) for k in keys) <= columns for keys in FIELDS.values())
    if preference:
        layout = detect(source.name, source.columns, source.rows[0], options.format, mapped, options.transcript,
                        chat_template=chat_template)
        if layout.format != "implicit_prompt":  # the prompt column alone: the responses do not matter here
            key = "prompt" if "prompt" in layout.columns else "messages"
            layout = Layout("prompts", {key: layout.columns[key]}, layout.conversational or key == "messages")
    elif prompt_column in columns or messages_column in columns:
        key, column = ("prompt", prompt_column) if prompt_column in columns else ("messages", messages_column)
        first = source.rows[0].get(column)
        layout = Layout("prompts", {key: column}, conversational=key == "messages" or is_messages(first))
    else:
        raise UserInputError(
            f"{field}: {source.name} has no prompts: expected a 'prompt' column (text or messages), a 'messages' "
            f"column (a conversation to continue) or preference data; the columns are {source.columns}"
        )
    chat = None
    if layout.conversational:
        require_template(tokenizer, f"{field}: {source.name}")
        chat = ChatTemplate(tokenizer)
    out: list[PromptExample] = []
    dropped: dict[str, int] = {}
    invalid: list[str] = []  # the first few dropped rows' errors, to show where
    cut = 0
    for index in range(len(source.rows)) if indices is None else indices:
        where = source.locate(index)
        try:
            values = extract(source.rows[index], layout, where)
            if layout.format == "prompts":
                messages, text = _prompt_only(chat, values, where)
            else:
                messages, text, _ = prompt_and_texts(tokenizer, chat, layout, values, where, with_responses=False)
            if messages and all(m["role"] == "system" for m in messages):
                # The template renders it and the model writes *something*, but nobody asked anything: most
                # likely the user turns were lost on the way (an export that kept only the system prompt).
                raise RowError(f"{where}: the prompt has only system messages, no user turn to answer; add the "
                               "user's message", "no user turn")
        except RowError as err:
            if options.on_invalid != "drop":
                raise RowError(f"{err} (or set data.on_invalid: drop to skip such rows)", err.reason) from None
            dropped[err.reason] = dropped.get(err.reason, 0) + 1
            if len(invalid) < SHOW_DROPPED:
                invalid.append(str(err))
            continue
        ids = encode_prompt(tokenizer, text)
        bos = tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]
        head = max(chat.head(messages, text, ids) if chat and messages else 0, int(bos))
        whole = len(ids)
        ids, _ = truncate(ids, [[]], options.max_length, options.max_prompt_length, head, bos)
        cut += len(ids) < whole
        out.append(PromptExample(ids, messages if messages is not None else text, index))
    if not out:
        first = f"; the first: {invalid[0]}" if invalid else ""
        raise UserInputError(f"{field}: no prompts left in {source.name}{first}")
    report_invalid(field, source.name, dropped, invalid)
    if cut:
        limit = (f"data.max_prompt_length {options.max_prompt_length}" if options.max_prompt_length
                 else f"data.max_length {options.max_length}")
        Console(stderr=True, soft_wrap=True, markup=False, highlight=False).print(
            f"{field}: cut {cut} of {len(out)} prompts of {source.name} to {limit} tokens (each keeps its start "
            "and its end, next to the completion)", style="yellow")
    return out, SplitStats.build(source.name, layout.describe(), [len(p.ids) for p in out], dropped)


def _prompt_only(chat: ChatTemplate | None, values: dict[str, Any], where: str) -> tuple[Any, str]:
    """(messages or None, prompt text) of a prompt-only row."""
    if "prompt" in values and chat is None:
        return None, values["prompt"]
    messages = values.get("prompt") or values["messages"]
    if "messages" in values and messages[-1]["role"] == "assistant":
        messages = messages[:-1]  # the turn to generate
    if not messages:
        raise RowError(f"{where}: the conversation has nothing before its assistant turn to prompt with", "empty field")
    return messages, chat.render(messages, where, generation_prompt=True)


def encode_completion(
    tokenizer: PreTrainedTokenizerBase, chat: ChatTemplate | None, prompt: Any, completion: str,
    prompt_ids: list[int] | None = None,
) -> tuple[list[int], list[int]]:
    """``(prompt ids, response ids)`` of a generated completion, as the data pipeline encodes a preference row
    with that prompt and that response text: a message-list prompt through the chat template (the completion as
    the assistant's turn, ending at the template's end-of-turn), a text prompt as text with EOS after the
    completion. So pairs made from generations train exactly as the same texts written to a file would.

    Args:
        tokenizer: the tokenizer.
        chat: its chat template (``None`` without one).
        prompt: the prompt as the data gave it.
        completion: the completion text.
        prompt_ids: the prompt's ids when already encoded (e.g. a :class:`PromptExample`'s, truncated as the data
            options say); else encoded here.
    """
    if isinstance(prompt, list):
        if chat is None:
            raise UserInputError(f"{type(tokenizer).__name__} has no chat template for message prompts")
        text = chat.render(prompt, "completion", generation_prompt=True)
        response = chat.response_text(prompt, text, [{"role": "assistant", "content": completion}], "completion",
                                      "completion")
        end_of_turn = chat.end_of_turn
    else:
        text, response, end_of_turn = prompt, completion, ""
    ids = prompt_ids if prompt_ids is not None else encode_prompt(tokenizer, text)
    return ids, encode_response(tokenizer, response, end_of_turn)


class PromptCollator:
    """Left-padded prompt batches (generation continues every row from its last token).

    Args:
        pad_token_id: the tokenizer's pad id.
        packing: ``data.packing``, stamped on each batch: how batches made of these prompts' completions are laid
            out (on-policy pairs train laid out as offline batches are).
    """

    def __init__(self, pad_token_id: int, packing: bool | str = False) -> None:
        self.pad_token_id, self.packing = pad_token_id, packing

    def __call__(self, examples: list[PromptExample]) -> PromptBatch:
        ids, mask = left_pad([e.ids for e in examples], self.pad_token_id)
        return PromptBatch(
            ids, mask, index=torch.tensor([e.index for e in examples], dtype=torch.long),
            prompts=[e.prompt for e in examples], weights=torch.tensor([e.weight for e in examples]),
            packing=self.packing,
        )
