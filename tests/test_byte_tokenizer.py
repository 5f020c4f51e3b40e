"""The ``"byte"`` tokenizer against ``transformers.ByT5Tokenizer``, whose ids and decoding it keeps."""

from __future__ import annotations

import random

from transformers import AutoTokenizer, ByT5Tokenizer

from lightning_pref.models import load_tokenizer

TEXTS = ["", "hi", "Human: hello\n\nAssistant:", "hé ünï 😀 x", "tabs\tand\r\nnewlines", "UPPER lower 123 !?"]


def test_encodes_as_byt5_without_special_tokens_and_adds_none():
    tokenizer, byt5 = load_tokenizer("byte"), ByT5Tokenizer()
    assert (len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id) == (len(byt5), 0, 1)
    for text in TEXTS:
        expected = byt5(text, add_special_tokens=False).input_ids
        assert expected == [b + 3 for b in text.encode()]  # ByT5's own rule, byte b at id b + 3
        assert tokenizer(text).input_ids == tokenizer(text, add_special_tokens=False).input_ids == expected


def test_decodes_as_byt5_including_bytes_that_are_not_text(tmp_path):
    """Random ids: specials, sentinels and byte runs that are not UTF-8 (ByT5 drops those bytes). The saved
    tokenizer, loaded without lightning-pref, decodes the same."""
    tokenizer, byt5 = load_tokenizer("byte"), ByT5Tokenizer()
    tokenizer.save_pretrained(tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path)
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(len(byt5)) for _ in range(rng.randrange(40))]
        expected = byt5.decode(ids, skip_special_tokens=True)
        assert tokenizer.decode(ids, skip_special_tokens=True) == saved.decode(ids, skip_special_tokens=True) == expected
    for text in TEXTS:
        assert saved.decode(saved(text).input_ids) == text
