"""``benchmarks/alignment_hh.py``'s split: the gold judge, the policies and the held-out evaluation never share a
prompt (a leak would let the gold judge or the held-out accuracy reward memorization)."""

from __future__ import annotations

import pytest

from benchmarks.alignment_hh import HH, Settings, split_hh


def _first_turn(pair: dict) -> str:
    return " ".join(pair["prompt"][0]["content"].lower().split())


def test_split_is_disjoint_by_prompt_seeded_and_complete():
    if not HH.is_file():
        pytest.skip(f"needs the shared HH-RLHF file ({HH})")
    from lightning_pref.models import load_tokenizer
    from tests.real import smollm2_dir

    tokenizer = load_tokenizer(str(smollm2_dir()))
    settings = Settings.hour()
    parts, counts = split_hh(settings, tokenizer)
    again, _ = split_hh(settings, tokenizer)
    assert parts == again  # seeded: a rerun trains and judges on the same pairs
    questions = {name: {_first_turn(p) for p in pairs} for name, pairs in parts.items()}
    assert not questions["A"] & questions["B"]
    assert not questions["A"] & questions["C"]
    assert not questions["B"] & questions["C"]
    assert sum(len(p) for p in parts.values()) == counts["kept_pairs"]
    assert counts["kept_pairs"] + counts["long_prompt"] + counts["unparsed_or_empty"] == counts["records"]
    for pairs in parts.values():
        for pair in pairs:
            assert pair["prompt"][-1]["role"] == "user"
            assert pair["chosen"][0]["content"] != pair["rejected"][0]["content"]
