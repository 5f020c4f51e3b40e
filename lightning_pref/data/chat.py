"""Conversations to prompt and response text with the tokenizer's chat template.

The prompt is rendered with ``add_generation_prompt=True`` (ending where the assistant starts to speak); a
response is the rendering of ``prompt + response`` *minus* the prompt's rendering. That subtraction is only
valid when the first rendering starts with the second, which is checked: a template that rewrites earlier
turns once more messages follow cannot be cut at the seam, and guessing would train on the wrong tokens.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from lightning_pref.errors import UserInputError

Messages = list[dict[str, str]]


def require_template(tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """Fail early, naming the source, when conversational data meets a tokenizer without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserInputError(
            f"{name}: the data is conversational (lists of role/content messages) but tokenizer "
            f"{type(tokenizer).__name__} has no chat template; use the chat model's tokenizer, set "
            "tokenizer.chat_template, or give plain-text prompt/chosen/rejected fields"
        )


def render(tokenizer: PreTrainedTokenizerBase, messages: Messages, where: str, generation_prompt: bool) -> str:
    """The chat template's text for ``messages``; template errors name the row."""
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    except Exception as err:  # broad on purpose: jinja raises its own types, e.g. "roles must alternate"
        raise UserInputError(f"{where}: the chat template cannot render this conversation: {err}") from None


def response_text(
    tokenizer: PreTrainedTokenizerBase, prompt: Messages, prompt_text: str, response: Messages, where: str, key: str
) -> str:
    """The text the template adds for ``response`` after ``prompt`` (rendered as ``prompt_text``)."""
    full = render(tokenizer, prompt + response, where, generation_prompt=False)
    if not full.startswith(prompt_text):
        raise UserInputError(
            f"{where}: the chat template's rendering of prompt + {key} does not start with its rendering of the "
            "prompt alone (add_generation_prompt=True), so the response cannot be cut at the seam; use a template "
            "that only appends for new turns"
        )
    return full[len(prompt_text) :]


def split_shared_messages(chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages]:
    """Implicit prompt of a conversation pair: the messages both share, split at a message boundary.

    Returns:
        ``(prompt, chosen_rest, rejected_rest)``.
    """
    k = 0
    while k < min(len(chosen), len(rejected)) and _same(chosen[k], rejected[k]):
        k += 1
    return chosen[:k], chosen[k:], rejected[k:]


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.get("role") == b.get("role") and a.get("content") == b.get("content")
