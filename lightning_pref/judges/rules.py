"""Rule judges whose right answer is computable: the embedded default's rule, for demos and tests."""

from __future__ import annotations

from collections.abc import Sequence

from lightning_pref.judges.base import Judge, Prompt
from lightning_pref.registry import register_judge


def shouting(text: str) -> float:
    """How much ``text`` shouts: (uppercase − lowercase letters) / letters, in [-1, 1]; 0 without letters."""
    upper = sum(c.isupper() for c in text)
    lower = sum(c.islower() for c in text)
    return (upper - lower) / max(1, upper + lower)


@register_judge("no_shouting")
class NoShoutingJudge(Judge):
    """The rule of the bundled synthetic data, *the preferred reply does not shout*: score = −:func:`shouting`,
    +1 for a reply in lowercase, −1 for one in UPPERCASE, 0 without letters."""

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        return [-shouting(c) for c in completions]
