"""The ``"byte"`` tokenizer: one token per UTF-8 byte, no files, and a ``tokenizer.json`` any user can load.

Ids are ByT5's (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, byte ``b`` at ``b + 3``, ``<extra_id_i>`` from 259 on, 384 in
all), so models trained with ``transformers.ByT5Tokenizer`` read the same ids, and so is decoding (bytes that do
not form UTF-8 text are dropped). Unlike ``ByT5Tokenizer`` it adds no special token when called:
``tokenizer(prompt)`` gives the prompt's bytes and nothing else, as lightning-pref's own prompt encoding does, so
a user of an exported model who calls the saved tokenizer on a prompt generates from the ids ``predict`` used,
not from a prompt that already ends with ``</s>``. Built with ``tokenizers`` (byte-level pre-tokenizer, a BPE
without merges), it saves as a ``tokenizer.json`` that ``AutoTokenizer`` loads without this package.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
_SENTINELS = 125  # ByT5's <extra_id_0> ... <extra_id_124>, kept so the vocabulary size (384) is ByT5's


def _byte_symbols() -> list[str]:
    """The byte-level pre-tokenizer's printable stand-in for each byte ``0 ... 255`` (GPT-2's table: printable
    Latin-1 bytes stand for themselves, the others for ``chr(256 + k)`` in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[byte] for byte in range(256)]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with ByT5's ids that adds no special tokens (see the module docstring)."""
    vocab = {PAD: 0, EOS: 1, UNK: 2, **{symbol: byte + 3 for byte, symbol in enumerate(_byte_symbols())}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    # No regex split and no prefix space: every byte of the text, spaces included, is one token.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    # Bytes that do not form UTF-8 text are dropped, as ByT5Tokenizer's decode drops them (errors="ignore"): the
    # byte-level decoder writes U+FFFD for each such run, removed here. Judges of a random model's samples
    # (e.g. quiet_letters' characters count) then read the same text as before.
    tokenizer.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("\ufffd", "")])
    specials = [PAD, EOS, UNK, *(f"<extra_id_{i}>" for i in range(_SENTINELS))]
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, unk_token=UNK)
