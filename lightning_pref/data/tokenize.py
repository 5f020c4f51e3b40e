"""Tokenization at the prompt/response seam.

Prompt and response are tokenized *separately* and concatenated, so the response token ids the model is scored
on are exactly the tokenization of the response (a BPE merge can never cross the seam). A response ends with
one stop token: the chat template's own end-of-turn when it has one (ChatML ``<|im_end|>``), else EOS, appended
once.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


@dataclass
class Encoded:
    """Token ids of one example: a prompt and one (unpaired) or two (paired) responses."""

    prompt: list[int]
    chosen: list[int]  # desirable completion for unpaired data
    rejected: list[int] | None = None  # None for unpaired data
    label: bool = True  # unpaired data: desirable?
    index: int = -1  # position in its split (to look up precomputed reference log-probs)
    weight: float = 1.0  # 0 for a duplicate padded in by a distributed sampler: not counted in metrics
    margin: float | None = None  # paired data with a margin column: how strongly chosen is preferred


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Prompt ids, with BOS first when the tokenizer normally adds one (Llama-style)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("x")["input_ids"][:1] == [bos] and ids[:1] != [bos]:
        ids = [bos, *ids]
    return ids


def encode_response(tokenizer: PreTrainedTokenizerBase, text: str, end_of_turn: str = "") -> list[int]:
    """Response ids ending with one stop token.

    Args:
        text: the response text (for a conversation, what the chat template renders for it).
        end_of_turn: the chat template's end-of-turn (see ``chat.ChatTemplate``); a text that ends with it is
            already ended. Otherwise EOS is appended (once, even if the text already ended with the EOS string).
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if (end_of_turn and text.endswith(end_of_turn)) or ids[-1:] == [eos]:
        return ids
    return [*ids, eos]


def truncate(
    prompt: list[int], responses: list[list[int]], max_length: int, max_prompt_length: int | None = None,
    head: int = 0, bos: bool = False,
) -> tuple[list[int], list[list[int]]]:
    """Fit ``prompt + response`` into ``max_length`` tokens for every response.

    A cut prompt keeps its first ``head`` tokens (BOS; for a chat prompt the header the template puts first,
    see ``chat.ChatTemplate.head``) and its *end* (the part next to the response); responses keep their
    *start*. First the prompt is cut to ``max_prompt_length``; if the longest response still does not fit, the
    prompt is cut further, but not below ``max_length // 2`` tokens; then responses are cut to what is left. A
    head longer than half of what the prompt keeps would crowd out the end (the question being answered), so
    then only BOS (when ``bos``: the prompt starts with it) and the end are kept. A response can come out empty
    only if ``max_length`` leaves no room for it; callers drop such examples.
    """
    keep = len(prompt) if max_prompt_length is None else min(len(prompt), max_prompt_length)
    longest = max(len(r) for r in responses)
    if keep + longest > max_length:
        keep = max(max_length - longest, min(keep, max_length // 2), 0)
    if keep < len(prompt):
        head = min(head if head <= keep // 2 else int(bos), keep)
        prompt = prompt[:head] + prompt[len(prompt) - (keep - head) :]
    room = max_length - len(prompt)
    return prompt, [r[:room] for r in responses]


def split_shared_text(tokenizer: PreTrainedTokenizerBase, chosen: str, rejected: str) -> tuple[str, str, str]:
    """Implicit prompt of a text pair (Anthropic-HH style): their shared prefix, cut at a token boundary.

    Both texts are tokenized and the prompt is the decoded common *token* prefix, so the cut never falls inside
    a token of either text (a character-level cut could split ``" Sure"`` into ``" Su" + "re"``).

    Returns:
        ``(prompt, chosen_response, rejected_response)``.
    """
    a = tokenizer(chosen, add_special_tokens=False)["input_ids"]
    b = tokenizer(rejected, add_special_tokens=False)["input_ids"]
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    # Decoding need not give back the exact text (a byte token may end inside a UTF-8 character, normalizers may
    # change spaces): back off a token at a time until the decoded prefix is a prefix of both texts.
    prefix = ""
    for n in range(k, 0, -1):
        text = tokenizer.decode(a[:n], clean_up_tokenization_spaces=False)
        if chosen.startswith(text) and rejected.startswith(text):
            prefix = text
            break
    return prefix, chosen[len(prefix) :], rejected[len(prefix) :]
