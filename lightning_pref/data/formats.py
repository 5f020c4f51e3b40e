"""Data formats, told apart by their columns, and per-row field checks.

=================  ==========================================  ===========================================
format             columns                                     values
=================  ==========================================  ===========================================
standard           ``prompt``, ``chosen``, ``rejected``        strings
conversational     ``prompt``, ``chosen``, ``rejected``        lists of ``{"role", "content"}`` messages
implicit_prompt    ``chosen``, ``rejected``                    full texts or full conversations; the
                                                               prompt is their shared prefix
unpaired           ``prompt``, ``completion``, ``label``       strings or messages; ``label`` a boolean
=================  ==========================================  ===========================================

Column names are remapped with ``data.columns`` (``{prompt: question, chosen: response_j}``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from lightning_pref.errors import UserInputError

Format = Literal["auto", "standard", "conversational", "implicit_prompt", "unpaired"]
FIELDS: dict[str, tuple[str, ...]] = {
    "standard": ("prompt", "chosen", "rejected"),
    "conversational": ("prompt", "chosen", "rejected"),
    "implicit_prompt": ("chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
}
CANONICAL = ("prompt", "chosen", "rejected", "completion", "label")
EXPECTED = (
    "prompt/chosen/rejected (standard or conversational), chosen/rejected (implicit prompt) or "
    "prompt/completion/label (unpaired)"
)
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Layout:
    """How to read a source's rows.

    Attributes:
        format: one of :data:`FIELDS`.
        columns: canonical field name -> the source's column name.
        conversational: values are message lists (rendered with the chat template) rather than strings.
    """

    format: str
    columns: dict[str, str]
    conversational: bool

    @property
    def paired(self) -> bool:
        return self.format != "unpaired"

    def describe(self) -> str:
        return f"{self.format}{' (conversational)' if self.conversational and self.format != 'conversational' else ''}"


def detect(
    name: str, columns: list[str], first: dict[str, Any], requested: str = "auto", mapping: dict[str, str] | None = None
) -> Layout:
    """Pick the format from the columns (and, for text vs messages, the first row's values).

    Args:
        name: the source, for error messages.
        columns: the source's column names.
        first: its first row.
        requested: ``data.format``; ``"auto"`` detects.
        mapping: ``data.columns``, canonical name -> column name.
    """
    mapping = dict(mapping or {})
    unknown = sorted(set(mapping) - set(CANONICAL))
    if unknown:
        raise UserInputError(f"data.columns: unknown field(s) {unknown}; map any of {list(CANONICAL)} to your columns")
    absent = {key: column for key, column in mapping.items() if column not in columns}
    if absent:
        raise UserInputError(
            f"{name}: data.columns maps {absent} but there is no such column; the columns are {columns}"
        )
    actual = {key: mapping.get(key, key) for key in CANONICAL}
    present = {key for key, column in actual.items() if column in columns}
    if requested == "auto":
        fmt = next((f for f in ("standard", "unpaired", "implicit_prompt") if set(FIELDS[f]) <= present), None)
        if fmt is None:
            mapped = f" (after data.columns {mapping})" if mapping else ""
            raise UserInputError(
                f"{name}: cannot tell the data format from its columns {columns}{mapped}: expected fields {EXPECTED}. "
                "Rename yours with data.columns, e.g. {prompt: question, chosen: response_j, rejected: response_k}"
            )
        if fmt == "standard" and isinstance(first.get(actual["chosen"]), list):
            fmt = "conversational"
    elif requested in FIELDS:
        fmt = requested
        missing = [actual[key] for key in FIELDS[fmt] if key not in present]
        if missing:
            raise UserInputError(
                f"{name}: data.format {fmt} needs column(s) {missing}, found {columns}; "
                "rename yours with data.columns"
            )
    else:
        raise UserInputError(f"data.format: unknown format {requested!r}; choose auto or one of {list(FIELDS)}")
    response = "completion" if fmt == "unpaired" else "chosen"
    conversational = fmt == "conversational" or (
        fmt != "standard" and isinstance(first.get(actual[response]), list)
    )
    return Layout(fmt, {key: actual[key] for key in FIELDS[fmt]}, conversational)


def extract(row: dict[str, Any], layout: Layout, where: str) -> dict[str, Any]:
    """The row's canonical fields, type-checked: strings or message lists, and a boolean ``label``."""
    out = {}
    for key, column in layout.columns.items():
        if column not in row:
            raise UserInputError(
                f"{where}: missing field {column!r}{_alias(key, column)}; found {sorted(row)}, expected fields {EXPECTED}"
            )
        value = row[column]
        name = f"field {column!r}{_alias(key, column)}"
        if key == "label":
            if not isinstance(value, bool):
                raise UserInputError(
                    f"{where}: {name} must be true or false, got {_kind(value)} ({value!r}); "
                    "write JSON booleans, not strings or numbers"
                )
        elif layout.conversational:
            _check_messages(value, where, name)
        elif not isinstance(value, str):
            hint = "; set data.format conversational for message lists" if isinstance(value, list) else ""
            raise UserInputError(f"{where}: {name} must be a string, got {_kind(value)}{hint}")
        elif not value.strip():
            raise UserInputError(f"{where}: {name} is empty; every example needs a non-empty prompt and response")
        out[key] = value
    return out


def _check_messages(value: Any, where: str, name: str) -> None:
    if not isinstance(value, list):
        raise UserInputError(f"{where}: {name} must be a list of {{role, content}} messages, got {_kind(value)}")
    if not value:
        raise UserInputError(f"{where}: {name} is empty; every example needs a non-empty prompt and response")
    for i, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise UserInputError(
                f"{where}: {name}[{i}] must be a message {{\"role\": str, \"content\": str}}, got {message!r:.80}"
            )
    if not any(m["content"].strip() for m in value):
        raise UserInputError(f"{where}: {name} has only empty messages; every example needs non-empty content")


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
