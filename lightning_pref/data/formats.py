"""Data formats, told apart by their columns, and per-row field checks.

=================  ==========================================  ===========================================
format             columns                                     values
=================  ==========================================  ===========================================
standard           ``prompt``, ``chosen``, ``rejected``        strings
conversational     ``prompt``, ``chosen``, ``rejected``        messages (a list, or one message object)
implicit_prompt    ``chosen``, ``rejected``                    full texts or full conversations; the
                                                               prompt is their shared prefix
unpaired           ``prompt``, ``completion``, ``label``       strings or messages; ``label`` a boolean
unpaired           ``messages``, ``label``                     one conversation; its last (assistant)
                                                               message is the completion
=================  ==========================================  ===========================================

A message is ``{"role", "content"}`` or ShareGPT's ``{"from": "human"|"gpt"|"system", "value"}`` (mapped to
user/assistant/system), told apart by its keys. Anthropic HH transcripts (``chosen``/``rejected`` strings
``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) become conversations with ``data.transcript`` (see :func:`detect`).
Column names are remapped with ``data.columns`` (``{prompt: question, chosen: response_j}``).

Every per-row problem raises :class:`~lightning_pref.errors.RowError` (``data.on_invalid: drop`` skips and
counts it); problems of a whole source raise a plain :class:`~lightning_pref.errors.UserInputError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from lightning_pref.checks import FLOAT32_MAX
from lightning_pref.errors import RowError, UserInputError

Format = Literal["auto", "standard", "conversational", "implicit_prompt", "unpaired"]
Transcript = Literal["auto", "hh", "none"]
FIELDS: dict[str, tuple[str, ...]] = {
    "standard": ("prompt", "chosen", "rejected"),
    "conversational": ("prompt", "chosen", "rejected"),
    "implicit_prompt": ("chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
}
#: Unpaired data given as whole conversations (the completion is the last message).
UNPAIRED_MESSAGES = ("messages", "label")
CANONICAL = ("prompt", "chosen", "rejected", "completion", "label", "messages", "margin")
#: Optional fields: read where the source has the column (``margin``: a pair's preference strength, as in Llama 2's
#: reward model; used by reward losses that take one).
OPTIONAL = ("margin",)
#: Fields holding numbers: checked to be finite when read.
NUMERIC = ("margin",)
EXPECTED = (
    "prompt/chosen/rejected (standard or conversational), chosen/rejected (implicit prompt) or "
    "prompt/completion/label or messages/label (unpaired)"
)
Messages = list[dict[str, str]]
#: ShareGPT speaker names (LLaMA-Factory, axolotl) -> chat-template roles.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
HH_START = "\n\nHuman:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass(frozen=True)
class Layout:
    """How to read a source's rows.

    Attributes:
        format: one of :data:`FIELDS`.
        columns: canonical field name -> the source's column name.
        conversational: values are messages (rendered with the chat template) rather than strings.
        transcript: ``chosen``/``rejected`` are Anthropic HH transcripts, parsed into conversations.
    """

    format: str
    columns: dict[str, str]
    conversational: bool
    transcript: bool = False

    @property
    def paired(self) -> bool:
        return self.format != "unpaired"

    def describe(self) -> str:
        if self.transcript:
            return f"{self.format} (HH transcript)"
        return f"{self.format}{' (conversational)' if self.conversational and self.format != 'conversational' else ''}"


def detect(
    name: str, columns: list[str], first: dict[str, Any], requested: str = "auto", mapping: dict[str, str] | None = None,
    transcript: str = "auto", chat_template: bool = False,
) -> Layout:
    """Pick the format from the columns (and, for text vs messages, the first row's values).

    Args:
        name: the source, for error messages.
        columns: the source's column names.
        first: its first row.
        requested: ``data.format``; ``"auto"`` detects.
        mapping: ``data.columns``, canonical name -> column name.
        transcript: ``data.transcript``: ``hh`` parses implicit-prompt ``chosen``/``rejected`` strings as
            Anthropic HH transcripts; ``auto`` does when the first row's both start with ``"\\n\\nHuman:"`` and
            the tokenizer has a chat template (without one they stay plain text); ``none`` never does.
        chat_template: whether the tokenizer has a chat template (for ``transcript: auto``).
    """
    mapping = dict(mapping or {})
    unknown = sorted(set(mapping) - set(CANONICAL))
    if unknown:
        raise UserInputError(f"data.columns: unknown field(s) {unknown}; map any of {list(CANONICAL)} to your columns")
    if transcript not in ("auto", "hh", "none"):
        raise UserInputError(f"data.transcript: unknown value {transcript!r}; choose auto, hh or none")
    absent = {key: column for key, column in mapping.items() if column not in columns}
    if absent:
        raise UserInputError(
            f"{name}: data.columns maps {absent} but there is no such column; the columns are {columns}"
        )
    actual = {key: mapping.get(key, key) for key in CANONICAL}
    present = {key for key, column in actual.items() if column in columns}
    fields = None
    if requested == "auto":
        fmt = next((f for f in ("standard", "unpaired", "implicit_prompt") if set(FIELDS[f]) <= present), None)
        if fmt is None and set(UNPAIRED_MESSAGES) <= present:
            fmt, fields = "unpaired", UNPAIRED_MESSAGES
        if fmt is None:
            mapped = f" (after data.columns {mapping})" if mapping else ""
            raise UserInputError(
                f"{name}: cannot tell the data format from its columns {columns}{mapped}: expected fields {EXPECTED}. "
                "Rename yours with data.columns, e.g. {prompt: question, chosen: response_j, rejected: response_k}"
            )
        if fmt == "standard" and is_messages(first.get(actual["chosen"])):
            fmt = "conversational"
    elif requested in FIELDS:
        fmt = requested
        if fmt == "unpaired" and not set(FIELDS[fmt]) <= present and set(UNPAIRED_MESSAGES) <= present:
            fields = UNPAIRED_MESSAGES
        missing = [actual[key] for key in fields or FIELDS[fmt] if key not in present]
        if missing:
            raise UserInputError(
                f"{name}: data.format {fmt} needs column(s) {missing}, found {columns}; "
                "rename yours with data.columns"
            )
    else:
        raise UserInputError(f"data.format: unknown format {requested!r}; choose auto or one of {list(FIELDS)}")
    fields = fields or FIELDS[fmt]
    response = fields[0] if fmt == "unpaired" else "chosen"  # completion, or messages
    conversational = fmt == "conversational" or (fmt != "standard" and is_messages(first.get(actual[response])))
    hh = False
    if fmt == "implicit_prompt" and not conversational:
        looks_hh = all(str(first.get(actual[k])).startswith(HH_START) for k in ("chosen", "rejected"))
        hh = transcript == "hh" or (transcript == "auto" and looks_hh and chat_template)
    elif transcript == "hh":
        raise UserInputError(
            f"{name}: data.transcript hh needs chosen/rejected transcript strings and no prompt column "
            f"(implicit prompt), but the data is {fmt}{' with messages' if conversational else ''}; "
            "set data.transcript: auto"
        )
    optional = [key for key in OPTIONAL if key in present and fmt != "unpaired"]
    return Layout(fmt, {key: actual[key] for key in (*fields, *optional)}, conversational or hh, transcript=hh)


def extract(row: dict[str, Any], layout: Layout, where: str) -> dict[str, Any]:
    """The row's canonical fields, type-checked: strings or message lists, and a boolean ``label``.

    Messages come back as ``[{"role", "content"}]`` lists whatever their form (ShareGPT, one message object,
    an HH transcript); ``messages`` (unpaired) comes back as ``prompt`` and ``completion``.

    Raises:
        RowError: the row does not fit the layout (naming the field and the fix).
    """
    out = {}
    for key, column in layout.columns.items():
        if column not in row and key in OPTIONAL:  # a JSON row without it: none for this row
            out[key] = None
            continue
        if column not in row:
            raise RowError(
                f"{where}: missing field {column!r}{_alias(key, column)}; found {sorted(row)}, expected fields "
                f"{EXPECTED}", "missing field",
            )
        value = row[column]
        name = f"field {column!r}{_alias(key, column)}"
        if key in NUMERIC:
            _number(value, where, name)
        elif key == "label":
            if not isinstance(value, bool):
                raise RowError(
                    f"{where}: {name} must be true or false, got {_kind(value)} ({value!r}); "
                    "write JSON booleans, not strings or numbers", "wrong type",
                )
        elif layout.transcript:
            value = _parse_transcript(_text(value, where, name), where, name)
        elif layout.conversational:
            value = _messages(value, where, name)
        else:
            value = _text(value, where, name)
        out[key] = value
    if "messages" in out and layout.format == "unpaired":
        out["prompt"], out["completion"] = _split_completion(out.pop("messages"), where, layout.columns["messages"])
    return out


def _number(value: Any, where: str, name: str) -> float | None:
    """A numeric field's value: a finite number, or null for none. JSON readers accept ``NaN`` and
    ``Infinity``, and Parquet holds them: such a value would reach the loss as NaN and be reported as a
    training problem far from its row."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RowError(f"{where}: {name} must be a number (or null), got {_kind(value)}", "wrong type")
    if not abs(value) <= FLOAT32_MAX:  # NaN and inf too; the loss takes it in float32
        raise RowError(f"{where}: {name} must be a finite number within float32's range (±{FLOAT32_MAX:.3g}), or "
                       f"null for none; got {value!r:.40}", "not finite")
    return value


def _text(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str):
        hint = "; set data.format conversational for message lists" if isinstance(value, list) and value and \
            is_messages(value) else ""
        raise RowError(f"{where}: {name} must be a string, got {_kind(value)}{hint}", "wrong type")
    if not value.strip():
        raise RowError(f"{where}: {name} is empty; every example needs a non-empty prompt and response", "empty field")
    return value


def _messages(value: Any, where: str, name: str) -> Messages:
    """``value`` as ``[{"role", "content"}]``: a message list or one message object, role/content or ShareGPT."""
    if isinstance(value, dict):  # chosen/rejected given as the one assistant message
        value = [value]
    if not isinstance(value, list):
        raise RowError(
            f"{where}: {name} must be a list of {{role, content}} messages (or one message), got {_kind(value)}",
            "wrong type",
        )
    if not value:
        raise RowError(f"{where}: {name} is empty; every example needs a non-empty prompt and response", "empty field")
    messages = [_message(m, where, f"{name}[{i}]") for i, m in enumerate(value)]
    if not any(m["content"].strip() for m in messages):
        raise RowError(f"{where}: {name} has only empty messages; every example needs non-empty content", "empty field")
    return messages


def _message(message: Any, where: str, name: str) -> dict[str, str]:
    if isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str):
        return {"role": message["role"], "content": message["content"]}
    if isinstance(message, dict) and isinstance(message.get("from"), str) and isinstance(message.get("value"), str):
        role = SHAREGPT_ROLES.get(message["from"])
        if role is None:
            raise RowError(
                f"{where}: {name} has ShareGPT speaker {message['from']!r}; expected one of "
                f"{list(SHAREGPT_ROLES)} (or give role/content messages)", "bad message",
            )
        return {"role": role, "content": message["value"]}
    raise RowError(
        f"{where}: {name} must be a message {{\"role\": str, \"content\": str}} or ShareGPT {{\"from\": str, "
        f"\"value\": str}}, got {message!r:.80}", "bad message",
    )


def _parse_transcript(text: str, where: str, name: str) -> Messages:
    """An Anthropic HH transcript ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` as user/assistant messages.

    A turn starts at ``"\\n\\nHuman:"`` or ``"\\n\\nAssistant:"``; anything else (a ``"Human:"`` inside a
    line, single newlines) is content. Contents are stripped: the template puts its own separators around them.
    Consecutive turns of one speaker (a few HH records have them) stay separate messages.
    """
    parts = _HH_TURN.split("\n\n" + text.lstrip())
    fix = "fix the row, or set data.transcript: none to read the data as plain text"
    if parts[0].strip():
        raise RowError(f"{where}: {name} is not an HH transcript: it has text before its first 'Human:' or 'Assistant:' turn; {fix}",
                       "bad transcript")
    speakers, contents = parts[1::2], parts[2::2]  # split() with one group: text, (speaker, content) * n
    turns = [{"role": _HH_ROLES[w], "content": c.strip()} for w, c in zip(speakers, contents, strict=True)]
    if turns[-1]["role"] != "assistant":
        raise RowError(f"{where}: {name} is not an HH transcript ending with an 'Assistant:' turn; {fix}",
                       "bad transcript")
    return turns


def _split_completion(messages: Messages, where: str, column: str) -> tuple[Messages, Messages]:
    """Unpaired conversation -> (prompt messages, the final assistant message as the completion)."""
    if messages[-1]["role"] != "assistant":
        raise RowError(
            f"{where}: field {column!r} must end with the assistant message to score (the completion), but its "
            f"last message has role {messages[-1]['role']!r}", "bad message",
        )
    if len(messages) == 1:
        raise RowError(f"{where}: field {column!r} has no prompt before its assistant completion", "empty field")
    return messages[:-1], messages[-1:]


def is_messages(value: Any) -> bool:
    """Whether a value is a conversation: a list of message objects, or one message object (a list of strings, a
    null or a number is a value of the wrong type, for the row's checks to name, not a reason to want a chat
    template)."""
    if isinstance(value, list):
        return all(isinstance(m, dict) for m in value)
    return isinstance(value, dict) and bool({"role", "from"} & set(value))


def _alias(key: str, column: str) -> str:
    return f" (data.columns {key})" if key != column else ""


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
