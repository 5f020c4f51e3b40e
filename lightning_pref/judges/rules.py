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


def no_shouting(prompt: object, completion: str) -> float:
    """The demo's rule as a plain function (for ``judge: {class_path: function, init_args: {fn: ...}}``):
    +1 for a completion in lowercase, -1 for one in UPPERCASE, 0 without letters."""
    return -shouting(completion)


def quiet_letters(prompt: object, completion: str) -> float:
    """The demo's rule as a dense reward: (lowercase − uppercase letters) / characters, in [-1, 1]. A reply
    of lowercase letters scores near 1; noise, silence and shouting score 0 or less, so learning it shows."""
    upper = sum(c.isupper() for c in completion)
    lower = sum(c.islower() for c in completion)
    return (lower - upper) / max(1, len(completion))


@register_judge("no_shouting")
class NoShoutingJudge(Judge):
    """The rule of the bundled synthetic data, *the preferred reply does not shout*: score = −:func:`shouting`,
    +1 for a reply in lowercase, −1 for one in UPPERCASE, 0 without letters."""

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        return [no_shouting(p, c) for p, c in zip(prompts, completions, strict=True)]
