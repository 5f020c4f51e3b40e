"""Conversations to prompt and response text with the tokenizer's chat template.

The prompt is rendered with ``add_generation_prompt=True`` (ending where the assistant starts to speak); a
response is the rendering of ``prompt + response`` *minus* the prompt's rendering. That subtraction is only
valid when the first rendering starts with the second, which is checked: a template that rewrites earlier
turns once more messages follow cannot be cut at the seam, and guessing would train on the wrong tokens.

What the template puts around turns is read off the template itself, by rendering probe conversations once per
tokenizer (not from a list of known tokens): the *end-of-turn* after an assistant message (ChatML's
``<|im_end|>``, Gemma's ``<end_of_turn>``), which ends a scored response, and the *header* before the first
user content (BOS, the system turn, given or the template's default), which truncation keeps.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from lightning_pref.data.formats import Messages
from lightning_pref.data.tokenize import encode_prompt
from lightning_pref.errors import RowError, UserInputError

#: Probe contents: text no template adds, so where it lands in a rendering shows what surrounds a message.
PROBE_USER = "lightning-pref probe: user content"
PROBE_ASSISTANT = "lightning-pref probe: assistant content"


def require_template(tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """Fail early, naming the source, when conversational data meets a tokenizer without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserInputError(
            f"{name}: the data is conversational (lists of role/content messages) but tokenizer "
            f"{type(tokenizer).__name__} has no chat template; use the chat model's tokenizer, set "
            "tokenizer.chat_template, or give plain-text prompt/chosen/rejected fields"
        )


class ChatTemplate:
    """A tokenizer's chat template, probed once for what it puts around turns.

    Attributes:
        end_of_turn: the text the template puts right after an assistant message's content, without trailing
            whitespace (ChatML ``"<|im_end|>"``); ``""`` when it puts nothing there, or when the probe cannot be
            rendered or found (then responses get EOS appended, as plain text does).
        after_turn: the whitespace after ``end_of_turn`` (ChatML ``"\\n"``): formatting before the next turn,
            never scored, since a model stops at the end-of-turn.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        probe = [{"role": "user", "content": PROBE_USER}, {"role": "assistant", "content": PROBE_ASSISTANT}]
        text = self._try_render(probe)
        at = text.rfind(PROBE_ASSISTANT) if text is not None else -1
        after = text[at + len(PROBE_ASSISTANT) :] if at >= 0 else ""
        self.end_of_turn = after.rstrip()
        self.after_turn = after[len(self.end_of_turn) :]
        self._heads: dict[tuple[tuple[str, str], ...], tuple[str, list[int]]] = {}

    def render(self, messages: Messages, where: str, generation_prompt: bool) -> str:
        """The chat template's text for ``messages``; template errors name the row."""
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
        except Exception as err:  # broad on purpose: jinja raises its own types, e.g. "roles must alternate"
            raise RowError(f"{where}: the chat template cannot render this conversation: {err}", "template error") from None

    def response_text(self, prompt: Messages, prompt_text: str, response: Messages, where: str, key: str) -> str:
        """The text the template adds for ``response`` after ``prompt`` (rendered as ``prompt_text``), ending with
        the template's end-of-turn (the whitespace after it is dropped)."""
        full = self.render(prompt + response, where, generation_prompt=False)
        if not full.startswith(prompt_text):
            raise RowError(
                f"{where}: the chat template's rendering of prompt + {key} does not start with its rendering of the "
                "prompt alone (add_generation_prompt=True), so the response cannot be cut at the seam; use a "
                "template that only appends for new turns", "template error",
            )
        text = full[len(prompt_text) :]
        if self.after_turn and text.endswith(self.end_of_turn + self.after_turn):
            text = text[: len(text) - len(self.after_turn)]
        return text

    def head(self, prompt: Messages, prompt_text: str, prompt_ids: list[int]) -> int:
        """How many leading ``prompt_ids`` are the template's header: everything before the first user content
        (BOS, the system turn, given or the template's default, the user turn's opening). 0 when the prompt does
        not start with that header."""
        system = tuple((m["role"], m["content"]) for m in _leading_system(prompt))
        if system not in self._heads:  # one render per distinct system turn: usually one per split
            text = self._try_render([*_leading_system(prompt), {"role": "user", "content": PROBE_USER}])
            header = text[: text.find(PROBE_USER)] if text is not None and PROBE_USER in text else ""
            self._heads[system] = header, encode_prompt(self.tokenizer, header) if header else []
        header, ids = self._heads[system]
        if not header or not prompt_text.startswith(header):
            return 0
        n = 0  # the header's tokens may merge with the content's first one: count the tokens both start with
        while n < min(len(ids), len(prompt_ids)) and ids[n] == prompt_ids[n]:
            n += 1
        return n

    def _try_render(self, messages: Messages) -> str | None:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:  # broad on purpose: a template may refuse the probe (e.g. it demands a system turn)
            return None


def split_shared_messages(chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages]:
    """Implicit prompt of a conversation pair: the messages both share, split at a message boundary.

    The prompt ends where an assistant turn starts in both (the prompt is rendered with the generation prompt,
    so a response must open with the assistant speaking): when the conversations part at a user message, the
    cut backs off to the last shared assistant turn.

    Returns:
        ``(prompt, chosen_rest, rejected_rest)``.
    """
    k = 0
    while k < min(len(chosen), len(rejected)) and _same(chosen[k], rejected[k]):
        k += 1
    while 0 < k < min(len(chosen), len(rejected)) and not chosen[k]["role"] == rejected[k]["role"] == "assistant":
        k -= 1
    return chosen[:k], chosen[k:], rejected[k:]


def _leading_system(messages: Messages) -> Messages:
    n = 0
    while n < len(messages) and messages[n]["role"] == "system":
        n += 1
    return messages[:n]


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.get("role") == b.get("role") and a.get("content") == b.get("content")
