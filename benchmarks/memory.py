"""Large-vocabulary memory benchmark: peak memory of a training step vs batch size at a 128k vocabulary.

    python benchmarks/memory.py                      # 128k vocab, batches 2 4 8 16, ~5 minutes on 2 CPU cores

Each (variant, batch) runs in its own subprocess: 1 warm-up + 1 measured step, and the peak resident memory of the
training steps is read (``VmHWM``, reset when training starts; CUDA: ``max_memory_allocated``). The budget is
what TRL needs at ``--budget-batch`` (8); the report gives each variant's peak at that batch relative to TRL's, and
the largest measured batch that stays within the budget (plus a linear interpolation between measured points).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_lib  # noqa: E402
import train_step  # noqa: E402

MODEL = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512,
}
# name -> (runner, lightning-pref options, description)
VARIANTS = {
    "floor": ("floor", {}, "plain PyTorch loop: full (N, T, V) logits + log_softmax"),
    "lp": ("lp", {}, "lightning-pref CLI, defaults (response-only head, vocabulary-aware chunk: 256 rows at 128k)"),
    "lp_chunk64": ("lp", {"chunk_size": 64}, "lightning-pref CLI, model.chunk_size=64 (below the default minimum)"),
    "lp_precomputed": ("lp", {"reference_mode": "precomputed"}, "lightning-pref CLI, reference_mode=precomputed"),
    "trl": ("trl", {}, "TRL DPOTrainer, defaults (fp32, report_to=none)"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=128_000)
    p.add_argument("--model-config", default=None, help="JSON or a JSON file (default: 2 layers x 64 Llama)")
    p.add_argument("--batches", default="2,4,8,16", help="batch sizes (pairs) to measure")
    p.add_argument("--budget-batch", type=int, default=8, help="the budget is TRL's peak at this batch")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--response-len", type=int, default=64)
    p.add_argument("--variants", default=None, help=f"subset of {list(VARIANTS)} (default: all; trl if installed)")
    p.add_argument("--no-trl", action="store_true")
    p.add_argument("--name", default="memory_vocab128k")
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--workdir", default=None)
    p.add_argument("--in-process", action="store_true", help="no subprocesses (memory numbers not isolated)")
    return p.parse_args(argv)


def largest_within(points: list[tuple[int, float]], budget: float) -> tuple[int | None, float | None]:
    """Largest measured batch whose peak is within ``budget``, and the batch where the piecewise-linear curve
    through the measurements crosses it (extrapolated from the last two points when all fit)."""
    points = sorted(points)
    fits = [b for b, m in points if m <= budget]
    measured = max(fits) if fits else None
    crossing = None
    for (b0, m0), (b1, m1) in zip(points, points[1:], strict=False):
        if m0 <= budget < m1:
            crossing = b0 + (budget - m0) * (b1 - b0) / (m1 - m0)
            break
    if crossing is None and len(points) >= 2 and points[-1][1] <= budget:
        (b0, m0), (b1, m1) = points[-2:]
        crossing = b1 + (budget - m1) * (b1 - b0) / (m1 - m0) if m1 > m0 else float("inf")
    return measured, crossing


def summary_step(results: dict, name: str, batch: int) -> float | None:
    r = results.get(name, {}).get(batch)
    return r["train_peak_rss_mb"] - r["rss_at_train_start_mb"] if r else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    names = [v.strip() for v in args.variants.split(",")] if args.variants else list(VARIANTS)
    if "trl" in names and (args.no_trl or find_spec("trl") is None):
        names.remove("trl")
    config = train_step.model_config(args.model_config) if args.model_config else dict(MODEL)
    workdir = Path(args.workdir or HERE / ".work" / args.name).resolve()
    (workdir / "runs").mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(exist_ok=True)
    tokenizer = bench_lib.build_tokenizer(args.vocab, workdir / "tokenizer")
    data: dict[int, dict[str, str]] = {}
    for b in batches:
        directory = workdir / f"data_b{b}"
        directory.mkdir(exist_ok=True)
        data[b] = bench_lib.write_data(
            bench_lib.make_pairs(3 * b, args.vocab, args.prompt_len, args.response_len, seed=b), directory
        )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "LIGHTNING_PREF_CACHE": str(workdir / "cache"), "WANDB_DISABLED": "true", "PYTHONWARNINGS": "ignore"}
    results: dict[str, dict[int, dict[str, Any]]] = {n: {} for n in names}
    errors = {}
    started = time.time()
    for b in batches:  # alternate variants at each batch size
        for name in names:
            runner, lp_options, _ = VARIANTS[name]
            tag = f"{name}_b{b}"
            spec = {
                "runner": runner, "loss": "dpo", "model": config, "vocab": args.vocab, "tokenizer": str(tokenizer),
                "data": data[b], "ids": data[b]["ids"], "batch_size": b, "prompt_len": args.prompt_len,
                "response_len": args.response_len, "steps": 1, "warmup": 1, "lr": 1e-4, "lp": lp_options,
                "precision": "32-true",
                "workdir": str(workdir), "run_dir": str(workdir / "runs" / tag),
                "result": str(workdir / "runs" / f"{tag}.json"),
            }
            spec_path = workdir / "runs" / f"{tag}.spec.json"
            spec_path.write_text(json.dumps(spec))
            log = workdir / "logs" / f"{tag}.log"
            code = train_step.run_spec(spec_path, env, log, args.in_process)
            if code != 0 or not Path(spec["result"]).is_file():
                errors[tag] = f"exit {code}, see {log}"
                print(f"[{tag}] FAILED, see {log}", file=sys.stderr)
                continue
            r = json.loads(Path(spec["result"]).read_text())
            results[name][b] = r
            print(f"[{tag}] train peak {r['train_peak_rss_mb']:8.0f} MB  ({r['seconds_per_step']:.2f} s/step)", flush=True)

    key = "cuda_max_allocated_mb" if any("cuda_max_allocated_mb" in r for v in results.values() for r in v.values()) \
        else "train_peak_rss_mb"
    budget = results.get("trl", {}).get(args.budget_batch, {}).get(key)
    summary: dict[str, Any] = {
        "name": args.name, "vocab": args.vocab, "model_config": config, "prompt_len": args.prompt_len,
        "response_len": args.response_len, "batches": batches, "metric": key, "budget_batch": args.budget_batch,
        "budget_mb": budget, "environment": bench_lib.environment(), "errors": errors, "variants": {},
        "wall_seconds": time.time() - started,
    }
    for name in names:
        points = [(b, r[key]) for b, r in sorted(results[name].items())]
        row: dict[str, Any] = {
            "description": VARIANTS[name][2],
            "peak_mb": {str(b): m for b, m in points},
            "rss_at_train_start_mb": {str(b): r["rss_at_train_start_mb"] for b, r in sorted(results[name].items())},
            "seconds_per_step": {str(b): r["seconds_per_step"] for b, r in sorted(results[name].items())},
            # What the training steps add on top of the process at training start (imports, weights, reference):
            # activations, gradients, optimizer state and transient logits.
            "step_mb": {str(b): r[key] - r["rss_at_train_start_mb"] for b, r in sorted(results[name].items())},
        }
        if budget:
            at = results[name].get(args.budget_batch, {}).get(key)
            row["peak_vs_trl_at_budget_batch"] = at / budget if at else None
            trl_step = summary_step(results, "trl", args.budget_batch)
            own_step = summary_step(results, name, args.budget_batch)
            row["step_mb_vs_trl_at_budget_batch"] = own_step / trl_step if own_step and trl_step else None
            row["largest_measured_batch_within_budget"], row["interpolated_batch_at_budget"] = largest_within(points, budget)
        summary["variants"][name] = row
    trl_fit = summary["variants"].get("trl", {}).get("interpolated_batch_at_budget")
    for row in summary["variants"].values():
        fit = row.get("interpolated_batch_at_budget")
        row["batch_at_budget_vs_trl"] = fit / trl_fit if fit and trl_fit else None
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0 if not errors else 1


def markdown(s: dict[str, Any]) -> str:
    f = train_step._fmt
    env = s["environment"]
    lines = [
        f"# {s['name']}: peak memory of a DPO training step at a {s['vocab']:,}-token vocabulary",
        "",
        f"Model: `{json.dumps(s['model_config'])}`, prompt {s['prompt_len']} + response {s['response_len']} tokens, "
        f"fp32, AdamW. Metric: `{s['metric']}` (peak during the training steps; weights, reference and optimizer "
        f"state included). Machine: {env['device']}, {env['cpu_count']} CPUs, torch {env['torch']}, trl {env['trl']}.",
        "",
        "| variant | " + " | ".join(f"batch {b} (MB)" for b in s["batches"])
        + f" | vs TRL at batch {s['budget_batch']} | largest batch ≤ budget (measured / interpolated) | vs TRL |",
        "|---|" + "---:|" * (len(s["batches"]) + 3),
    ]
    for name, r in s["variants"].items():
        cells = [f(r["peak_mb"].get(str(b)), ",.0f") for b in s["batches"]]
        lines.append(
            f"| `{name}` | " + " | ".join(cells)
            + f" | {f(r.get('peak_vs_trl_at_budget_batch'), '.2f')}× | {f(r.get('largest_measured_batch_within_budget'), 'd')}"
            f" / {f(r.get('interpolated_batch_at_budget'), '.1f')} | {f(r.get('batch_at_budget_vs_trl'), '.2f')}× |"
        )
    lines += ["", f"Budget: TRL's peak at batch {s['budget_batch']} = {f(s['budget_mb'], ',.0f')} MB. The interpolated batch "
              "is linear between measured points, and an extrapolation from the last two points when every measured "
              "batch fits (then only the measured value is established).", "",
              "Memory added by the training steps (peak minus the RSS at training start, which holds the imported "
              "libraries, the weights and the reference):", "",
              "| variant | " + " | ".join(f"batch {b} (MB)" for b in s["batches"]) + f" | vs TRL at batch {s['budget_batch']} |",
              "|---|" + "---:|" * (len(s["batches"]) + 1)]
    for name, r in s["variants"].items():
        cells = [f(r["step_mb"].get(str(b)), ",.0f") for b in s["batches"]]
        lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {f(r.get('step_mb_vs_trl_at_budget_batch'), '.2f')}× |")
    lines += ["", "Variants:", ""]
    lines += [f"- `{n}`: {r['description']}" for n, r in s["variants"].items()]
    if s["errors"]:
        lines += ["", "Failed runs: " + ", ".join(f"`{k}`" for k in s["errors"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
