"""Regenerate every committed table under benchmarks/results/ (CPU: about 40-60 minutes on 2 cores).

    python benchmarks/run_all.py            # or: make bench
    python benchmarks/run_all.py --quick    # fewer steps and repetitions, a few minutes (numbers are noisier)
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
    args = p.parse_args()
    steps = (["--steps", "3", "--warmup", "1", "--repeats", "3"] if args.quick
             else ["--steps", "6", "--warmup", "2", "--repeats", "5"])
    commands = [
        ["train_step.py", "--loss", "dpo", *steps],
        ["train_step.py", "--loss", "kto", "--variants", "floor,lp,lp_bare,trl", *steps],
        ["memory.py"],
        # Fixed per-step framework cost: a model so small that the step is all overhead.
        ["train_step.py", "--loss", "dpo", "--name", "overhead_tiny", "--model-config", json.dumps(TINY),
         "--vocab", "512", "--batch-size", "2", "--prompt-len", "16", "--response-len", "16",
         "--steps", "60", "--warmup", "5", "--repeats", "3", "--variants", "floor,lp,lp_bare,trl"],
    ]
    if not args.skip_options:
        commands.append(["train_step.py", "--loss", "dpo", "--name", "train_step_dpo_options", "--variants",
                         "floor,lp,lp_gc,lp_compile,lp_varlen,lp_grouped", *steps])
    failed = 0
    for command in commands:
        print("+ python benchmarks/" + " ".join(command), flush=True)
        failed |= subprocess.run([sys.executable, str(HERE / command[0]), *command[1:]]).returncode != 0
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
