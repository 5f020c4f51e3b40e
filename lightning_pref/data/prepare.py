"""Raw rows to encoded examples: format, text, seam-correct token ids, truncation, and what was dropped."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from transformers import PreTrainedTokenizerBase

from lightning_pref.data.chat import ChatTemplate, Messages, require_template, split_shared_messages
from lightning_pref.data.formats import Layout, detect, extract
from lightning_pref.data.sources import Source
from lightning_pref.data.stats import SplitStats
from lightning_pref.data.tokenize import encode_prompt, encode_response, split_shared_text, truncate
from lightning_pref.errors import RowError, UserInputError

#: With ``on_invalid: drop``, how many dropped rows are shown (their one-line errors) after loading.
SHOW_DROPPED = 5


@dataclass(frozen=True)
class Options:
    """The data options that shape encoded examples (all part of the cache key)."""

    format: str = "auto"
    columns: tuple[tuple[str, str], ...] = ()  # data.columns as sorted items, so the options hash
    max_length: int = 512
    max_prompt_length: int | None = None
    unpair: bool = False
    on_identical: str = "warn"
    transcript: str = "auto"
    on_invalid: str = "error"


def prepare(
    source: Source, indices: Sequence[int], tokenizer: PreTrainedTokenizerBase, options: Options, field: str
) -> tuple[dict[str, list], SplitStats]:
    """Encode the rows ``indices`` of ``source``.

    Returns:
        Columns ``prompt``, ``chosen``, ``rejected`` (token ids; ``rejected`` is ``None`` for unpaired
        examples), ``label``, ``length`` (prompt + longest response) and ``margin`` (``None`` without a margin
        column), and the split's stats.

    Raises:
        UserInputError: bad rows (naming file, line and field; with ``on_invalid: drop`` they are skipped and
            counted instead), a source that does not fit (format, chat template), or no example left.
    """
    if options.on_invalid not in ("error", "drop"):
        raise UserInputError(f"data.on_invalid: unknown value {options.on_invalid!r}; choose error or drop")
    layout = detect(source.name, source.columns, source.rows[0], options.format, dict(options.columns),
                    options.transcript, chat_template=bool(getattr(tokenizer, "chat_template", None)))
    chat = None
    if layout.conversational:
        require_template(tokenizer, f"{field}: {source.name}")
        chat = ChatTemplate(tokenizer)  # probed once per split, not per row
    columns: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], "label": [], "length": [], "margin": []}
    dropped = {"identical": 0, "truncated": 0}
    invalid: list[str] = []  # the first few dropped rows' errors, to show where
    for index in indices:
        where = source.locate(index)
        try:
            values = extract(source.rows[index], layout, where)
            if layout.paired and values["chosen"] == values["rejected"]:
                if options.on_identical == "error":
                    raise UserInputError(
                        f"{where}: chosen and rejected are identical, so the pair says nothing; remove it, or set "
                        "data.on_identical: warn to drop such pairs"
                    )
                if options.on_identical == "warn":
                    dropped["identical"] += 1
                    continue
            prompt_messages, prompt_text, texts = prompt_and_texts(tokenizer, chat, layout, values, where)
        except RowError as err:
            if options.on_invalid != "drop":
                raise RowError(f"{err} (or set data.on_invalid: drop to skip such rows)", err.reason) from None
            dropped[err.reason] = dropped.get(err.reason, 0) + 1
            if len(invalid) < SHOW_DROPPED:
                invalid.append(str(err))
            continue
        prompt = encode_prompt(tokenizer, prompt_text)
        responses = [encode_response(tokenizer, t, chat.end_of_turn if chat else "") for t in texts]
        bos = tokenizer.bos_token_id is not None and prompt[:1] == [tokenizer.bos_token_id]
        head = max(chat.head(prompt_messages, prompt_text, prompt) if chat else 0, int(bos))
        prompt, responses = truncate(prompt, responses, options.max_length, options.max_prompt_length, head, bos)
        # No response token left to score, or a pair cut down to the same tokens: no signal left, so drop it.
        cut_to_same = layout.paired and responses[0] == responses[1] and values["chosen"] != values["rejected"]
        if cut_to_same or any(not r for r in responses):
            dropped["truncated"] += 1
            continue
        if not layout.paired:
            _append(columns, prompt, responses[0], None, values["label"])
        elif options.unpair:  # each pair becomes a desirable and an undesirable example
            _append(columns, prompt, responses[0], None, True)
            _append(columns, prompt, responses[1], None, False)
        else:
            _append(columns, prompt, responses[0], responses[1], True, values.get("margin"))
    fmt = layout.describe() + (", unpaired" if options.unpair and layout.paired else "")
    stats = SplitStats.build(source.name, fmt, columns["length"], dropped)
    _check_left(stats, len(indices), options, field, invalid)
    console = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)
    if dropped["identical"]:
        console.print(
            f"{field}: dropped {dropped['identical']} pairs of {source.name} whose chosen and rejected are "
            "identical (data.on_identical: keep keeps them, error stops at the first)", style="yellow",
        )
    report_invalid(field, source.name, dropped, invalid)
    return columns, stats


def report_invalid(field: str, source: str, dropped: dict[str, int], invalid: list[str]) -> None:
    """Print how many rows ``data.on_invalid: drop`` skipped, by reason, and the first ones' errors (the counts of
    ``dropped`` that are not failed checks, identical and truncated pairs, are reported on their own)."""
    if not invalid:
        return
    reasons = {r: n for r, n in dropped.items() if r not in ("identical", "truncated")}
    console = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)
    console.print(f"{field}: dropped {sum(reasons.values())} rows of {source} that fail a check "
                  f"({', '.join(f'{n} {r}' for r, n in reasons.items())}; data.on_invalid: drop); the first:",
                  style="yellow")
    for message in invalid:
        console.print(f"  {message}", style="yellow")


def prompt_and_texts(
    tokenizer: PreTrainedTokenizerBase, chat: ChatTemplate | None, layout: Layout, values: dict[str, Any], where: str,
    with_responses: bool = True,
) -> tuple[Messages | None, str, list[str]]:
    """Prompt messages (``None`` for text), prompt text and response texts of one row, conversations rendered
    with the chat template. Without ``with_responses`` only the prompt is wanted (generation): the responses
    are neither checked nor rendered, and come back empty."""
    keys = ["completion"] if layout.format == "unpaired" else ["chosen", "rejected"]
    if layout.format == "implicit_prompt":
        split = split_shared_messages if layout.conversational else _split_text(tokenizer)
        prompt, *responses = split(values["chosen"], values["rejected"])
        if not prompt:
            raise RowError(
                f"{where}: chosen and rejected share no prefix, so there is no prompt to take from them; give a "
                "prompt column, or full texts that start with the same prompt", "no shared prompt",
            )
    else:
        prompt, responses = values["prompt"], [values[k] for k in keys]
    if not with_responses:
        return (prompt, chat.render(prompt, where, generation_prompt=True), []) if chat else (None, prompt, [])
    for key, response in zip(keys, responses, strict=True):
        # Only possible once a shared prefix is taken as the prompt (or the completion split off a conversation):
        # one text is a prefix of the other, or the differing assistant turn is empty (e.g. "Assistant: " in HH).
        if isinstance(response, str) and not response.strip():
            raise RowError(
                f"{where}: the {key} response is empty once the shared prefix is taken as the prompt (one text is a "
                "prefix of the other); fix or remove the pair", "empty response",
            )
        if not isinstance(response, str) and not any(m["content"].strip() for m in response):
            raise RowError(
                f"{where}: the {key} response has no text: after the prompt its assistant turn is empty or missing; "
                "fix or remove the example", "empty response",
            )
    if chat is None:
        return None, prompt, responses
    prompt_text = chat.render(prompt, where, generation_prompt=True)
    texts = [chat.response_text(prompt, prompt_text, r, where, k) for k, r in zip(keys, responses, strict=True)]
    for key, text in zip(keys, texts, strict=True):
        if not text.strip():
            raise RowError(f"{where}: the chat template renders the {key} response as empty text", "empty response")
    return prompt, prompt_text, texts


def _split_text(tokenizer: PreTrainedTokenizerBase):
    return lambda chosen, rejected: split_shared_text(tokenizer, chosen, rejected)


def _append(columns: dict[str, list], prompt: list[int], chosen: list[int], rejected: list[int] | None,
            label: bool, margin: float | None = None) -> None:
    columns["prompt"].append(prompt)
    columns["chosen"].append(chosen)
    columns["rejected"].append(rejected)
    columns["label"].append(label)
    columns["margin"].append(margin)
    columns["length"].append(len(prompt) + max(len(chosen), len(rejected or ())))


def _check_left(stats: SplitStats, rows: int, options: Options, field: str, invalid: list[str]) -> None:
    if stats.kept:
        return
    if stats.dropped.get("truncated") == rows:
        raise UserInputError(
            f"{field}: all {rows} examples of {stats.source} were dropped by truncation (no response token fits "
            f"in max_length={options.max_length}); raise data.max_length or lower data.max_prompt_length"
        )
    why = ", ".join(f"{n} {reason}" for reason, n in stats.dropped.items())
    first = f"; the first invalid one: {invalid[0]}" if invalid else ""
    raise UserInputError(f"{field}: no examples left in {stats.source} after filtering ({why} of {rows} dropped){first}")
