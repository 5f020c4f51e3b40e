"""The judge interface: a plugin that scores completions of prompts, or prefers one of two; and the checks its
output passes where it enters training or evaluation (:func:`judge_scores`, :func:`judge_preferences`)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence, Sized
from typing import Any, ClassVar

from lightning_pref.checks import FLOAT32_MAX
from lightning_pref.errors import UserInputError, call_plugin
from lightning_pref.registry import Recorded

#: A prompt as the data gave it: a string, or a list of ``{"role", "content"}`` messages.
Prompt = str | list[dict[str, Any]]


class Judge(Recorded):
    """Judges completions: :meth:`score` each (higher is better), or :meth:`prefer` one of two.

    Implement ``score`` (a rule, a reward model), ``prefer`` (a pairwise judge, e.g. a model asked which of two
    is better), or both. ``prefer`` defaults to comparing scores, so every scoring judge also ranks; a judge
    with only ``prefer`` cannot report mean scores.

    Register one with ``@register_judge("name")`` or the ``lightning_pref.judges`` entry-point group; it is
    then given by name, class name or import path (``--judge name``, ``judge: {class_path: name}``).
    """

    registered_name: ClassVar[str] = ""  # set by ``register_judge``

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        """One score per ``(prompt, completion)``, higher is better."""
        raise NotImplementedError(f"{type(self).__name__} only compares completions (prefer), it does not score")

    def prefer(self, prompts: Sequence[Prompt], first: Sequence[str], second: Sequence[str]) -> list[int]:
        """Per prompt: ``1`` when ``first`` is better, ``-1`` when ``second`` is, ``0`` for a tie."""
        # checked scores: a NaN compares as neither greater nor smaller, so it would pass as a tie
        a, b = judge_scores(self, prompts, first), judge_scores(self, prompts, second)
        return [(x > y) - (x < y) for x, y in zip(a, b, strict=True)]

    @property
    def scores(self) -> bool:
        """Whether this judge gives scores (it overrides :meth:`score`), not only preferences."""
        return type(self).score is not Judge.score


def check_scoring(judge: Judge, option: str, why: str) -> None:
    """Refuse a judge that only compares (``prefer``) where each completion needs a score of its own (``why``)."""
    if not judge.scores and type(judge).prefer is Judge.prefer:  # a class that forgot both, or misnamed them
        raise UserInputError(f"{option}: {_name(judge)} defines neither score nor prefer; a judge overrides score "
                             "(prompts, completions -> a number each) or prefer (prompts, first, second -> 1, -1 or 0)")
    if not judge.scores:
        raise UserInputError(f"{option}: {_name(judge)} only compares two completions (prefer); {why}, so it needs a "
                             "judge that scores each one (a function judge without pairwise, a reward model, a rule)")


def judge_scores(judge: Judge, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
    """``judge.score``, checked where its output enters: one finite number per completion.

    Raises:
        UserInputError: naming the judge, the offending value and what ``score`` must return (a NaN, ``None``, a
            string or a tensor would otherwise turn into ties, skipped steps or invalid JSON downstream); or
            naming the judge and the error it raised, and where.
    """
    name = _name(judge)
    values = call_plugin(f"judge {name}: score", "fix the judge", judge.score, prompts, completions)
    _check_length(name, "score", values, len(completions))
    out = []
    for i, value in enumerate(values):
        number = _number(value)
        if number is None or not math.isfinite(number):
            raise UserInputError(
                f"judge {name}: score returned {value!r} for completion {i}; a judge's score must be one finite "
                "number (int, float or bool) per completion"
            )
        if abs(number) > FLOAT32_MAX:  # training holds scores in float32: it would be inf, and the loss NaN
            raise UserInputError(f"judge {name}: score returned {value!r} for completion {i}, beyond float32's "
                                 f"range (±{FLOAT32_MAX:.3g}) in which scores are trained on; scale the judge's "
                                 "scores")
        out.append(number)
    return out


def judge_preferences(judge: Judge, prompts: Sequence[Prompt], first: Sequence[str], second: Sequence[str]) -> list[int]:
    """``judge.prefer``, checked where its output enters: one of 1, 0, -1 per comparison.

    Raises:
        UserInputError: naming the judge, the offending value and what ``prefer`` must return; or naming the
            judge and the error it raised, and where.
    """
    name = _name(judge)
    values = call_plugin(f"judge {name}: prefer", "fix the judge", judge.prefer, prompts, first, second)
    _check_length(name, "prefer", values, len(first))
    out = []
    for i, value in enumerate(values):
        number = _number(value)
        if number not in (1, 0, -1):
            raise UserInputError(
                f"judge {name}: prefer returned {value!r} for comparison {i}; it must return 1 (first better), -1 "
                "(second better) or 0 (tie) per comparison"
            )
        out.append(int(number))
    return out


def _name(judge: Judge) -> str:
    """The judge as users gave it: its registered name (or class) and the arguments that differ from the
    defaults, e.g. ``function(fn='my_pkg.rules:score')``."""
    name = judge.registered_name or type(judge).__name__
    given = judge.spec["init_args"] if hasattr(judge, "spec") else {}
    try:
        defaults = {k: p.default for k, p in inspect.signature(type(judge).__init__).parameters.items()}
    except (TypeError, ValueError):
        defaults = {}
    args = ", ".join(f"{k}={v!r}" for k, v in given.items() if defaults.get(k, inspect.Parameter.empty) != v)
    return f"{name}({args})" if args else name


def _check_length(name: str, method: str, values: Any, expected: int) -> None:
    if not isinstance(values, Sized) or isinstance(values, str | bytes) or len(values) != expected:
        got = f"{len(values)} values" if isinstance(values, Sized) and not isinstance(values, str) else repr(values)
        raise UserInputError(f"judge {name}: {method} returned {got} for {expected} completions; it must return a list "
                             "with one value per completion")


def _number(value: Any) -> float | None:
    """``value`` as a float when it is a plain number (a 0-d tensor or NumPy scalar counts), else ``None``."""
    if isinstance(value, bool | int | float):
        try:
            return float(value)
        except OverflowError:  # an int beyond any float
            return math.inf
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        try:
            item = value.item()
        except (ValueError, RuntimeError):
            return None
        return float(item) if isinstance(item, bool | int | float) else None
    return None
