"""The bundled synthetic preference set, with a preference rule known in advance so learning can be measured.

Rule: *the preferred reply does not shout.* Each prompt asks about a made-up topic word; the chosen reply and
the rejected reply say the same words, the chosen one in lowercase, the rejected one in UPPERCASE. A policy
that learned the preference gives the chosen reply a higher implicit reward, so held-out reward accuracy
measures it. Train and validation use disjoint topic words, so validation measures generalization, not
memorization.

Regenerate the bundled files with ``python -m lightning_pref.data.synthetic``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "st", "pl", "gr"]
_VOWELS = ["a", "e", "i", "o", "u"]
_ASKS = ["Tell me about {t}.", "What is {t}?", "Describe {t} briefly.", "Why do people like {t}?"]
_REPLIES = [
    "{t} is a small thing that many people enjoy.",
    "people say {t} is calm and useful.",
    "{t} comes from an old town by the sea.",
    "i think {t} is good for a quiet day.",
]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3)))


def generate(num_pairs: int, seed: int, exclude: set[str] = frozenset()) -> tuple[list[dict[str, str]], set[str]]:
    """``num_pairs`` records ``{"prompt", "chosen", "rejected"}`` and their topic words.

    Topic words in ``exclude`` are not used.
    """
    rng = random.Random(seed)
    records, topics = [], set()
    while len(records) < num_pairs:
        topic = _word(rng)
        if topic in exclude:
            continue
        topics.add(topic)
        reply = rng.choice(_REPLIES).format(t=topic)
        records.append(
            {
                "prompt": f"User: {rng.choice(_ASKS).format(t=topic)}\nAssistant:",
                "chosen": " " + reply,
                "rejected": " " + reply.upper(),
            }
        )
    return records, topics


def main(out_dir: str | None = None) -> None:
    out = Path(out_dir) if out_dir else Path(__file__).resolve().parents[1] / "assets"
    out.mkdir(parents=True, exist_ok=True)
    val, val_topics = generate(256, seed=1)
    train, _ = generate(2048, seed=0, exclude=val_topics)
    for name, records in (("train", train), ("val", val)):
        with open(out / f"synthetic_{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


if __name__ == "__main__":
    main()
