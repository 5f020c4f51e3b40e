"""Checks of option values against their meaning, shared by every module, data module and plugin, so that an
option outside its range, or one that would be ignored, is one line naming the option and the fix (exit 2)
wherever it is given: never a NaN passed on, a value silently replaced, or an option quietly dropped."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from lightning_pref.errors import UserInputError

#: The largest float32 (``torch.finfo(torch.float32).max``): numbers the losses take in float32 (a judge's score,
#: a pair's margin) must stay within it, or they become inf there and the loss NaN.
FLOAT32_MAX = 3.4028234663852886e38


def check_range(
    option: str, value: Any, low: float | None = None, high: float | None = None, *, low_open: bool = False,
    high_open: bool = False, integer: bool = False, hint: str = "",
) -> None:
    """Refuse ``value`` unless it is a finite number within ``[low, high]`` (each end open when asked); ``None``
    passes (an option left unset).

    Args:
        option: the option as users write it (``model.min_gap``), named in the message.
        value: the value given.
        low: the smallest value allowed (``None``: no bound).
        high: the largest value allowed (``None``: no bound).
        low_open: ``low`` itself is not allowed.
        high_open: ``high`` itself is not allowed.
        integer: the value must be a whole number.
        hint: what to do instead, appended to the message.

    Raises:
        UserInputError: ``option: must be <range>, got <value>; <hint>``.
    """
    if value is None:
        return
    number = isinstance(value, int | float) and not isinstance(value, bool)
    ok = number and math.isfinite(value) and not (integer and not float(value).is_integer())
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise UserInputError(f"{option}: must be {describe_range(low, high, low_open, high_open, integer)}, got "
                             f"{value!r}" + (f"; {hint}" if hint else ""))


def describe_range(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False,
                   integer: bool = False) -> str:
    """``"a finite number in (0, 1]"``, ``"an integer >= 1"``, ...: the range as the messages say it."""
    what = "an integer" if integer else "a finite number"
    if low is not None and high is not None:
        return f"{what} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{what} {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{what} {'<' if high_open else '<='} {high:g}"
    return what


def check_choice(option: str, value: Any, choices: Iterable[Any]) -> None:
    """Refuse ``value`` unless it is one of ``choices`` (a ``Literal`` option built from Python, where no parser
    has checked it)."""
    choices = tuple(choices)
    if value not in choices:
        raise UserInputError(f"{option}: {value!r} is not one of {', '.join(str(c) for c in choices)}")


def refuse_unused(option: str, value: Any, why: str) -> None:
    """An option given where nothing reads it: one line saying why it would be ignored and what to do.

    Args:
        option: the option given.
        value: its value, for the message.
        why: why it would have no effect, and the fix (e.g. ``"only used with model.ref_sync_steps; ..."``).
    """
    raise UserInputError(f"{option}: {value!r} would be ignored: {why}")


def check_output_path(option: str, path: str | Path, kind: Literal["file", "directory"]) -> Path:
    """Refuse, before any work, an output path that cannot be written: one that goes through an existing file
    (``mkdir`` would fail after generating or judging), a file where a directory is wanted, or a directory where
    a file is (``os.replace`` cannot put a file there, even with an overwrite flag). Existing targets are the
    caller's to refuse or replace.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UserInputError(f"{option}: {path} goes through {blocking}, which is a file; choose another path")
    if kind == "file" and path.is_dir():
        raise UserInputError(f"{option}: {path} is a directory; give the path of a file (in it, or elsewhere)")
    if kind == "directory" and path.exists() and not path.is_dir():
        raise UserInputError(f"{option}: {path} is a file; a directory is written there, so choose another path")
    return path
