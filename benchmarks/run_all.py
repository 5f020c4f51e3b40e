"""Regenerate every committed table under benchmarks/results/ (CPU: about an hour on 2 cores).

    python benchmarks/run_all.py            # or: make bench
    python benchmarks/run_all.py --quick    # fewer steps and repetitions, a few minutes (numbers are noisier)
    python benchmarks/run_all.py --gpu      # on a GPU: the ~0.5B-parameter bf16 tables (results/gpu_*)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip-options", action="store_true", help="skip the gradient_checkpointing/compile/grouping table")
    p.add_argument("--skip-memory", action="store_true", help="skip the 128k-vocabulary memory table")
    p.add_argument("--gpu", action="store_true",
                   help="the GPU tables instead: ~0.5B-parameter Llama (preset 0.5b), bf16-mixed, 32k vocabulary")
    p.add_argument("--peak-tflops", default="989", help="--gpu: datasheet bf16 dense peak (H100 SXM: 989)")
    args = p.parse_args()
    steps = (["--steps", "3", "--warmup", "1", "--repeats", "3"] if args.quick
             else ["--steps", "10", "--warmup", "2", "--repeats", "7"])
    if args.gpu:
        return run(gpu_commands(args.peak_tflops))
    commands = [
        ["train_step.py", "--loss", "dpo", *steps],
        ["train_step.py", "--loss", "kto", "--variants", "floor,lp,lp_bare,trl", *steps],
        # Real preference lengths (Anthropic HH): padded vs packed vs shared prompts vs TRL.
        ["train_step.py", "--loss", "dpo", "--lengths", "hh", "--name", "train_step_dpo_hh",
         "--variants", "floor,lp,lp_packed,lp_shared,trl", *steps],
        ["train_step.py", "--loss", "kto", "--lengths", "hh", "--name", "train_step_kto_hh",
         "--variants", "floor,lp,lp_packed,trl", *steps],
        # Precomputed vs model mode, the closest call: runs in one process, 9 repetitions, 20 steps each.
        ["train_step.py", "--loss", "dpo", "--name", "precomputed_ab", "--variants", "lp,lp_precomputed", "--no-trl",
         "--in-process", *steps, "--steps", "20", "--warmup", "3", "--repeats", "9"],
        *([] if args.skip_memory else [["memory.py"]]),
        # Fixed per-step framework cost: a model so small that the step is all overhead.
        ["train_step.py", "--loss", "dpo", "--name", "overhead_tiny", "--model-config", json.dumps(TINY),
         "--vocab", "512", "--batch-size", "2", "--prompt-len", "16", "--response-len", "16",
         "--steps", "60", "--warmup", "5", "--repeats", "3", "--variants", "floor,lp,lp_bare,trl"],
    ]
    if not args.skip_options:
        commands.append(["train_step.py", "--loss", "dpo", "--name", "train_step_dpo_options", "--variants",
                         "floor,lp,lp_gc,lp_compile,lp_bf16,lp_varlen,lp_grouped", *steps, "--repeats", "5"])
    return run(commands)


#: Result names (``<name>.json`` / ``.md``) of the GPU tables, in the order :func:`gpu_commands` runs them.
GPU_TABLES = ("gpu_dpo_0.5b", "gpu_dpo_0.5b_options")


def gpu_commands(
    peak_tflops: str = "989", steps: int = 10, warmup: int = 3, repeats: int = 3, options_repeats: int | None = None,
    extra: dict[str, list[str]] | None = None,
) -> list[list[str]]:
    """The GPU tables' commands (script name first, relative to ``benchmarks/``): the ~0.5B Llama in bf16-mixed,
    lightning-pref against the floor, precomputed reference and TRL, then the options table.

    Args:
        peak_tflops: the datasheet bf16 dense peak for the second MFU column (H100/H200 SXM: 989).
        steps, warmup, repeats: measured steps, warm-up steps and alternating repetitions per variant; the
            defaults are the committed tables'; ``benchmarks/gpu_check.py`` passes fewer to fit its budget.
        options_repeats: repetitions of the options table (``None`` = ``repeats``; 0 leaves it out).
        extra: more arguments per table name (e.g. ``--out-dir``, ``--workdir``).
    """
    shape = ["--model-config", "0.5b", "--vocab", "32000", "--precision", "bf16-mixed", "--peak-tflops", str(peak_tflops),
             "--prompt-len", "256", "--response-len", "768", "--steps", str(steps), "--warmup", str(warmup),
             "--batch-size", "8"]
    variants = {GPU_TABLES[0]: ("floor,lp,lp_precomputed,trl", repeats),
                GPU_TABLES[1]: ("floor,lp,lp_gc,lp_compile", repeats if options_repeats is None else options_repeats)}
    return [["train_step.py", "--loss", "dpo", "--name", name, *shape, "--variants", names, "--repeats", str(n),
             *(extra or {}).get(name, [])]
            for name, (names, n) in variants.items() if n > 0]


def run(commands: list[list[str]]) -> int:
    failed = 0
    for command in commands:
        print("+ python benchmarks/" + " ".join(command), flush=True)
        failed |= subprocess.run([sys.executable, str(HERE / command[0]), *command[1:]]).returncode != 0
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
