"""Reading raw preference rows from where people keep them, with errors that name the file, line and field.

One reader per kind of source:

- ``.jsonl`` (one object per line) and ``.json`` (a list of objects), also gzipped (``.jsonl.gz``,
  ``.json.gz``): read here, so a malformed line is reported with its line number. A ``.json`` file that is
  really JSON Lines (common on the Hugging Face hub) is read as JSONL.
- ``.parquet`` and ``.csv`` files, directories written by ``Dataset.save_to_disk`` and Hugging Face dataset
  ids: read with the ``datasets`` library (Arrow, memory-mapped, cached by ``datasets``).

A dataset with several splits (a ``DatasetDict`` directory or a hub id) takes its split from a ``:split``
suffix (``Anthropic/hh-rlhf:test``), else ``train`` for ``data.train`` and ``validation``/``test`` for
``data.val``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from lightning_pref.errors import UserInputError

ARROW_SUFFIXES = {".parquet": "parquet", ".csv": "csv"}
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
#: Split taken from a multi-split dataset when the path names none, by config field.
DEFAULT_SPLITS = {"data.train": ("train",), "data.val": ("validation", "valid", "val", "test")}


@dataclass
class Source:
    """Raw rows of one file or dataset.

    Attributes:
        name: the path or dataset id, as the user gave it.
        rows: row dicts (a list, or a memory-mapped ``datasets.Dataset``).
        columns: column names (for JSON, the keys of every row, the first row's first).
        fingerprint: changes whenever the content may have changed; keys the tokenization cache.
        locate: row index -> ``"file:line"`` text for error messages.
    """

    name: str
    rows: Sequence[dict[str, Any]]
    columns: list[str]
    fingerprint: str
    locate: Callable[[int], str]


def bundled(split: str) -> str:
    """Path of a split (``train``/``val``) of the bundled synthetic preference set."""
    return str(resources.files("lightning_pref") / "assets" / f"synthetic_{split}.jsonl")


def read_source(path: str, field: str) -> Source:
    """Read a preference file, a ``save_to_disk`` directory or a Hugging Face dataset id.

    Args:
        path: the file, directory or dataset id (optionally with a ``:split`` suffix).
        field: the config field naming it (e.g. ``data.train``), for error messages.
    """
    file = Path(path)
    suffix = _suffix(file)
    if file.is_file():
        if suffix in ARROW_SUFFIXES:
            return _read_arrow_file(file, path, field)
        if suffix not in JSON_SUFFIXES:
            raise UserInputError(
                f"{field}: {path}: unsupported file type {suffix!r}; give .jsonl, .json (optionally .gz), "
                ".parquet or .csv"
            )
        return _read_json(file, path, field)
    if file.is_dir():
        return _read_dataset(path, field, local=True)
    if suffix in (*JSON_SUFFIXES, *ARROW_SUFFIXES) or path.startswith((".", "/", "~")):
        raise UserInputError(
            f"{field}: file not found: {path} (give a .jsonl, .json (optionally .gz), .parquet or .csv file, a "
            "directory written by Dataset.save_to_disk, or a Hugging Face dataset id)"
        )
    return _read_dataset(path, field, local=False)


def _suffix(file: Path) -> str:
    """``.jsonl.gz`` for a gzipped file (its inner type matters), else the last suffix."""
    return "".join(file.suffixes[-2:]) if file.suffix == ".gz" else file.suffix


def _file_fingerprint(file: Path) -> str:
    stat = file.stat()
    return _digest(str(file.resolve()), stat.st_size, stat.st_mtime_ns)


def _digest(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _read_json(file: Path, path: str, field: str) -> Source:
    try:
        # A gzipped file is decompressed whole, like a plain one is read whole: line numbers stay the file's own.
        raw = gzip.decompress(file.read_bytes()) if file.suffix == ".gz" else file.read_bytes()
    except (OSError, EOFError) as err:  # a broken or truncated .gz
        raise UserInputError(f"{field}: cannot read {path} as {_suffix(file)}: {_first_line(err)}") from None
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or raw[:2] == b"\x1f\x8b":  # the fix is not latin1's
        what, fix = (("gzip-compressed", f"name it {file.name}.gz, or decompress it") if raw[:2] == b"\x1f\x8b"
                     else ("UTF-16 text", "save it as UTF-8 (e.g. iconv -f utf-16 -t utf-8)"))
        raise UserInputError(f"{path}: {what}, not UTF-8 JSON lines; {fix}")
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # a BOM (editors on Windows write one) is not data
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserInputError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); save the file as UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8)"
        ) from None
    if _suffix(file) in (".json", ".json.gz") and not text.lstrip().startswith("{"):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserInputError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
        if not isinstance(records, list):
            raise UserInputError(f"{path}: a .json file must hold a list of records; use .jsonl for one per line")
        numbered = [(f"{path}:record {i + 1}", r) for i, r in enumerate(records)]
    else:
        numbered = []
        # split("\n"), not splitlines(): JSON strings may hold a raw U+2028 or \x1c, which splitlines breaks on.
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise UserInputError(f"{path}:{lineno}: invalid JSON ({err.msg}); each line must be one object") from None
    for where, record in numbered:
        if not isinstance(record, dict):
            raise UserInputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if not numbered:
        raise UserInputError(f"{field}: {path} contains no records")
    wheres = [w for w, _ in numbered]
    rows = [r for _, r in numbered]
    # Every row's keys, the first row's first: a column only later rows have (say a margin) is read, not dropped.
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return Source(path, rows, columns, _file_fingerprint(file), wheres.__getitem__)


def _read_arrow_file(file: Path, path: str, field: str) -> Source:
    import datasets

    reader = datasets.Dataset.from_parquet if file.suffix == ".parquet" else datasets.Dataset.from_csv
    try:
        dataset = reader(str(file))
    except Exception as err:  # broad on purpose: pyarrow/pandas raise many types; the user needs the file named
        while (err.__cause__ or err.__context__) is not None:  # datasets wraps the reader's error (which names the
            err = err.__cause__ or err.__context__  # line) in "An error occurred while generating the dataset"
        if "corresponds to no data" in str(err) or "No columns to parse" in str(err):  # a header only, or nothing
            raise UserInputError(f"{field}: {path} contains no records") from None
        raise UserInputError(f"{field}: cannot read {path} as {ARROW_SUFFIXES[file.suffix]}: {_first_line(err)}") from None
    return _dataset_source(dataset, path, field, _file_fingerprint(file))


def _read_dataset(path: str, field: str, *, local: bool) -> Source:
    import datasets

    name, split = path, None
    if not local and ":" in path:
        name, split = path.rsplit(":", 1)
    try:
        if local:
            loaded = datasets.load_from_disk(path)
        else:
            loaded = datasets.load_dataset(name, split=split) if split else datasets.load_dataset(name)
    except Exception as err:  # broad on purpose: missing dirs, hub errors, offline mode: all one message
        raise UserInputError(
            f"{field}: cannot load {path!r}: not a preference file, not a directory written by "
            f"Dataset.save_to_disk, and not a loadable Hugging Face dataset ({_first_line(err)})"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        wanted = [split] if split else DEFAULT_SPLITS.get(field, ("train",))
        found = next((s for s in wanted if s in loaded), None)
        if found is None:
            raise UserInputError(
                f"{field}: {path} has splits {sorted(loaded)}, none of {list(wanted)}; name one as {name}:SPLIT"
            )
        loaded, name = loaded[found], f"{name}:{found}"
    return _dataset_source(loaded, name, field, _digest(name, loaded._fingerprint))


def _dataset_source(dataset: Any, name: str, field: str, fingerprint: str) -> Source:
    if len(dataset) == 0:
        raise UserInputError(f"{field}: {name} contains no records")
    return Source(name, dataset, list(dataset.column_names), fingerprint, lambda i: f"{name}:row {i + 1}")


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
