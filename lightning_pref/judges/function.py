"""A judge that is a Python function, given by import path."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from lightning_pref.errors import UserInputError
from lightning_pref.judges.base import Judge, Prompt
from lightning_pref.registry import register_judge


@register_judge("function")
class FunctionJudge(Judge):
    """Scores with ``fn(prompt, completion) -> float`` (a bool counts as 0/1), or prefers with
    ``fn(prompt, first, second) -> int`` (1, -1 or 0) when ``pairwise``.

    In YAML: ``judge: {class_path: function, init_args: {fn: my_pkg.rules:score}}``.

    Args:
        fn: import path of the function, ``package.module:name`` or ``package.module.name``.
        pairwise: ``fn`` compares two completions instead of scoring one.
    """

    def __init__(self, fn: str, pairwise: bool = False) -> None:
        self.fn_path, self.pairwise = fn, pairwise
        self.fn = _import(fn)

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[Any]:
        if self.pairwise:
            return super().score(prompts, completions)
        # as returned: judge_scores checks them (float() would turn "0.5" into a number, None into a TypeError)
        return [self.fn(p, c) for p, c in zip(prompts, completions, strict=True)]

    def prefer(self, prompts: Sequence[Prompt], first: Sequence[str], second: Sequence[str]) -> list[Any]:
        if not self.pairwise:
            return super().prefer(prompts, first, second)
        return [self.fn(p, a, b) for p, a, b in zip(prompts, first, second, strict=True)]  # checked by the caller

    @property
    def scores(self) -> bool:
        return not self.pairwise


def _import(path: str) -> Callable:
    module, sep, name = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), name) if sep and module else None
    except ImportError as err:
        raise UserInputError(f"judge.fn: cannot import {module!r} for {path!r} ({err})") from None
    except AttributeError:
        fn = None
    if not callable(fn):
        raise UserInputError(f"judge.fn: {path!r} is not a function; give package.module:function")
    return fn
