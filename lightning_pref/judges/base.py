"""The judge interface: a plugin that scores completions of prompts, or prefers one of two."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

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
        a, b = self.score(prompts, first), self.score(prompts, second)
        return [(x > y) - (x < y) for x, y in zip(a, b, strict=True)]

    @property
    def scores(self) -> bool:
        """Whether this judge gives scores (it overrides :meth:`score`), not only preferences."""
        return type(self).score is not Judge.score
