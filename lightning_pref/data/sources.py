"""Reading preference records from local files, with errors that name the file, line and field."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from lightning_pref.errors import UserInputError

PAIRED_FIELDS = ("prompt", "chosen", "rejected")
UNPAIRED_FIELDS = ("prompt", "completion", "label")


def bundled(split: str) -> str:
    """Path of a split (``train``/``val``) of the bundled synthetic preference set."""
    return str(resources.files("lightning_pref") / "assets" / f"synthetic_{split}.jsonl")


def read_records(path: str, field: str) -> list[dict[str, Any]]:
    """Read a ``.jsonl`` (one object per line) or ``.json`` (a list of objects) file.

    Args:
        path: the file.
        field: the config field naming the file (e.g. ``data.train``), for error messages.
    """
    file = Path(path)
    if not file.is_file():
        raise UserInputError(f"{field}: file not found: {path} (give a .jsonl or .json file of preference records)")
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserInputError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
        if not isinstance(records, list):
            raise UserInputError(f"{path}: a .json file must hold a list of records; use .jsonl for one per line")
        numbered = [(i + 1, r) for i, r in enumerate(records)]
        where = "record"
    else:
        numbered = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((lineno, json.loads(line)))
            except json.JSONDecodeError as err:
                raise UserInputError(f"{path}:{lineno}: invalid JSON ({err.msg}); each line must be one object") from None
        where = "line"
    out = []
    for n, record in numbered:
        if not isinstance(record, dict):
            raise UserInputError(f"{path}:{where} {n}: expected a JSON object, got {type(record).__name__}")
        record["_where"] = f"{path}:{where} {n}" if where == "record" else f"{path}:{n}"
        out.append(record)
    if not out:
        raise UserInputError(f"{field}: {path} contains no records")
    return out


def validate(record: dict[str, Any]) -> bool:
    """Check a record's fields; return ``True`` for paired and ``False`` for unpaired (KTO) records."""
    where = record["_where"]
    if all(k in record for k in PAIRED_FIELDS):
        fields, paired = PAIRED_FIELDS, True
    elif all(k in record for k in UNPAIRED_FIELDS):
        fields, paired = UNPAIRED_FIELDS, False
    else:
        present = sorted(k for k in record if k != "_where")
        raise UserInputError(
            f"{where}: expected fields {'/'.join(PAIRED_FIELDS)} (paired) or {'/'.join(UNPAIRED_FIELDS)} "
            f"(unpaired); found {present}"
        )
    for key in fields:
        value = record[key]
        if key == "label":
            if not isinstance(value, bool):
                raise UserInputError(f"{where}: field 'label' must be true or false, got {value!r}")
        elif not isinstance(value, str):
            raise UserInputError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
        elif not value.strip() and key != "prompt":
            raise UserInputError(f"{where}: field {key!r} is empty")
    return paired
