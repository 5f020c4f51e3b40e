"""Token lengths of real preference data, for benchmarks that run without the data.

    python benchmarks/hh_lengths.py ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz --tokenizer DIR

Encodes an Anthropic HH file exactly as training does (``PreferenceDataModule``: the transcripts become chat
conversations rendered with the tokenizer's chat template, ``max_length`` / ``max_prompt_length`` truncation) and
writes each kept example's ``[prompt, chosen, rejected]`` token counts to ``benchmarks/data/hh_lengths.json``. The
benchmark (``train_step.py --lengths hh``) draws random-token pairs with these lengths, so its padding and prompt
repetition are those of real multi-turn data.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "data" / "hh_lengths.json"


def encoded_lengths(path: str, tokenizer: str, max_length: int, max_prompt_length: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from lightning_pref import PreferenceDataModule

    dm = PreferenceDataModule(train=path, val=None, tokenizer=AutoTokenizer.from_pretrained(tokenizer),
                              max_length=max_length, max_prompt_length=max_prompt_length, on_invalid="drop",
                              cache=False)
    dm.setup("fit")
    table = dm.datasets["train"].table
    return [[len(p), len(c), len(r)] for p, c, r in zip(table["prompt"], table["chosen"], table["rejected"], strict=True)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="an HH-format preference file (.jsonl or .jsonl.gz)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (the lengths are in its tokens)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-prompt-length", type=int, default=256)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    lengths = encoded_lengths(args.data, args.tokenizer, args.max_length, args.max_prompt_length)
    totals = sorted(x[0] + max(x[1], x[2]) for x in lengths)
    summary = {
        "source": Path(args.data).name, "tokenizer": Path(args.tokenizer).name, "max_length": args.max_length,
        "max_prompt_length": args.max_prompt_length, "examples": len(lengths),
        "median_prompt": statistics.median(x[0] for x in lengths),
        "median_response": statistics.median(x[1] for x in lengths + [[0, x[2], 0] for x in lengths]),
        "p50_p90_max_sequence": [totals[len(totals) // 2], totals[int(len(totals) * 0.9)], totals[-1]],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({**summary, "lengths": lengths}) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
