"""Training-step benchmark: lightning-pref vs a plain PyTorch loop vs TRL, same model, data and optimizer.

    python benchmarks/train_step.py --loss dpo --batch-size 8 --prompt-len 64 --response-len 96 --vocab 8000 \
        --steps 20 --repeats 5

Every variant runs in its own subprocess (fair peak-memory numbers, no shared allocator or compile caches), and
the variants are run in alternation, repetition after repetition (A B C, C B A, A B C, ...), so slow drift of
the machine hits all of them alike; reported values are medians over repetitions, and ratios are medians of
per-repetition ratios (runs of one repetition are close in time). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_lib  # noqa: E402

SMOKE_MODEL = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128,
}

# name -> (runner, lightning-pref options, dataset, description)
VARIANTS: dict[str, tuple[str, dict[str, Any], str, str]] = {
    "floor": ("floor", {}, "main", "plain PyTorch loop: full logits + log_softmax, AdamW (the floor)"),
    "lp": ("lp", {}, "main", "lightning-pref via the CLI (reference_mode=model, response_only_head)"),
    "lp_full_head": ("lp", {"response_only_head": False}, "main", "lightning-pref CLI, response_only_head=false"),
    "lp_precomputed": ("lp", {"reference_mode": "precomputed"}, "main", "lightning-pref CLI, reference_mode=precomputed"),
    "lp_bare": ("lp_bare", {}, "main", "diagnostic: bare Trainer (no progress bar/logger/checkpoint callbacks)"),
    "lp_gc": ("lp", {"gradient_checkpointing": True}, "main", "lightning-pref CLI, gradient_checkpointing=true"),
    "lp_compile": ("lp", {"compile": True}, "main", "lightning-pref CLI, compile=true"),
    "lp_bf16": ("lp", {"precision": "bf16-mixed"}, "main", "lightning-pref CLI, trainer.precision=bf16-mixed"),
    "lp_varlen": ("lp", {}, "varlen", "lightning-pref CLI on variable-length data, group_by_length=false"),
    "lp_grouped": ("lp", {"group_by_length": True}, "varlen", "lightning-pref CLI on variable-length data, group_by_length=true"),
    "lp_packed": ("lp", {"packing": True}, "main", "lightning-pref CLI, data.packing=true (sequences end to end in rows)"),
    "lp_shared": ("lp", {"packing": "shared"}, "main", "lightning-pref CLI, data.packing=shared (packed, each pair's prompt once)"),
    "trl": ("trl", {}, "main", "TRL DPOTrainer / KTOTrainer, defaults (the benchmark's precision, report_to=none)"),
}
DEFAULT_VARIANTS = ["floor", "lp", "lp_full_head", "lp_precomputed", "lp_bare"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loss", choices=["dpo", "kto"], default="dpo")
    p.add_argument("--model-config", default=None,
                   help=f"transformers config fields as JSON, a path to a JSON file, or a preset "
                        f"{sorted(bench_lib.MODEL_PRESETS)} (default: small = 4 layers x 256 Llama)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step (KTO: 2x this many unpaired examples)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--response-len", type=int, default=96, help="response tokens including EOS")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--steps", type=int, default=20, help="measured steps per run (after the warm-up)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps per run, excluded from timing")
    p.add_argument("--repeats", type=int, default=3, help="alternating repetitions of every variant (>= 3)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--precision", choices=list(bench_lib.PRECISIONS), default="32-true",
                   help="every variant's precision (Lightning names; the floor and TRL reproduce it)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's datasheet dense peak in the run's precision (H100 SXM bf16: 989), for a "
                        "second MFU column next to the one against the measured matmul peak")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated subset of {list(VARIANTS)} (default: {','.join(DEFAULT_VARIANTS)} + opt-ins + trl)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="add the lp_gc variant")
    p.add_argument("--compile", action="store_true", help="add the lp_compile variant")
    p.add_argument("--bf16", action="store_true", help="add the lp_bf16 variant (bf16-mixed, the rest at --precision)")
    p.add_argument("--group-by-length", action="store_true",
                   help="add lp_varlen / lp_grouped on a variable-length copy of the data (see --length-jitter)")
    p.add_argument("--length-jitter", type=float, default=0.5,
                   help="variable-length data: lengths uniform in [(1-j)L, L] (used by --group-by-length only)")
    p.add_argument("--lengths", choices=["fixed", "hh"], default="fixed",
                   help="fixed: every pair --prompt-len + --response-len; hh: (prompt, chosen, rejected) token counts "
                        "drawn from Anthropic HH (benchmarks/data/hh_lengths.json, see hh_lengths.py)")
    p.add_argument("--packing", action="store_true", help="add the lp_packed and lp_shared variants")
    p.add_argument("--no-trl", action="store_true", help="skip TRL even when it is installed")
    p.add_argument("--name", default=None, help="result file name (default: train_step_<loss>)")
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--workdir", default=None, help="generated data, logs and run dirs (default: benchmarks/.work/<name>)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny model, 2 measured steps, 1 repetition, floor + lp only (for tests)")
    p.add_argument("--in-process", action="store_true",
                   help="run the variants in this process instead of one subprocess each (faster start; memory "
                        "numbers are then not isolated). Implied by --smoke")
    p.add_argument("--resummarize", action="store_true",
                   help="rewrite the tables from the run results already in --workdir (same arguments as the run)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.model_config = args.model_config or json.dumps(SMOKE_MODEL)
        args.batch_size, args.prompt_len, args.response_len, args.vocab = 2, 8, 8, 256
        args.steps, args.warmup, args.repeats = 2, 1, 1
        args.variants = args.variants or "floor,lp"
        args.in_process = True
    return args


def model_config(value: str | None) -> dict[str, Any]:
    if value is None or value in bench_lib.MODEL_PRESETS:
        return dict(bench_lib.MODEL_PRESETS[value or "small"])
    path = Path(value)
    return json.loads(path.read_text() if path.is_file() else value)


def chosen_variants(args: argparse.Namespace) -> list[str]:
    if args.variants:
        names = [v.strip() for v in args.variants.split(",") if v.strip()]
    else:
        names = list(DEFAULT_VARIANTS)
        names += ["lp_gc"] if args.gradient_checkpointing else []
        names += ["lp_compile"] if args.compile else []
        names += ["lp_bf16"] if args.bf16 else []
        names += ["lp_varlen", "lp_grouped"] if args.group_by_length else []
        names += ["lp_packed", "lp_shared"] if args.packing else []
        names += ["trl"]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if args.loss == "kto" and "lp_precomputed" in names and not args.variants:
        names.remove("lp_precomputed")  # KTO's KL rows are drawn per batch: lightning-pref refuses precomputed
    if "trl" in names and (args.no_trl or find_spec("trl") is None):
        names.remove("trl")
    if "floor" not in names:
        names.insert(0, "floor")  # every ratio is against the floor
    return names


def flops_per_token(loss: str, n: int) -> int:
    """Nominal model FLOPs per trained token: 6N policy forward+backward + 2N reference forward; KTO adds the KL
    rows' policy and reference forwards (4N per token, one KL row per trained row, same lengths)."""
    return 8 * n + (4 * n if loss == "kto" else 0)


def run_worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    from workers import RUNNERS

    result = RUNNERS[spec["runner"]](spec)
    Path(spec["result"]).write_text(json.dumps(result))


def run_spec(spec_path: Path, env: dict[str, str], log: Path, in_process: bool = False) -> int:
    """Run one variant: in a fresh subprocess (default) or in this process; output to ``log``; exit status."""
    if in_process:
        return run_in_process(spec_path, env, log)
    with log.open("w") as out:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
                              stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(HERE.parent))
    return proc.returncode


def run_in_process(spec_path: Path, env: dict[str, str], log: Path) -> int:
    """Run one variant in this process (``--in-process``), its output to ``log``; returns an exit status."""
    import contextlib
    import traceback

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        with log.open("w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                run_worker(str(spec_path))
                return 0
            except BaseException:  # noqa: BLE001 - reported like a failed subprocess
                traceback.print_exc()
                return 1
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker)
        return 0
    if args.repeats < 3 and not args.smoke:
        print(f"note: --repeats {args.repeats} < 3: medians over so few repetitions do not cancel drift", file=sys.stderr)
    name = args.name = args.name or ("smoke" if args.smoke else f"train_step_{args.loss}")
    workdir = Path(args.workdir or HERE / ".work" / name).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    variants = chosen_variants(args)
    config = model_config(args.model_config)

    # Data: enough pairs that no run wraps around an epoch.
    n_pairs = (args.warmup + args.steps + 1) * args.batch_size
    tokenizer = bench_lib.build_tokenizer(args.vocab, workdir / "tokenizer")
    datasets = {}
    for key, jitter, seed in (("main", 0.0, 0), ("varlen", args.length_jitter, 1)):
        if key == "varlen" and not any(VARIANTS[v][2] == "varlen" for v in variants):
            continue
        directory = workdir / f"data_{key}"
        directory.mkdir(exist_ok=True)
        if args.lengths == "hh":
            pairs = bench_lib.make_pairs_like(n_pairs, args.vocab, seed=seed)
            # the longest drawn prompt and response: every framework's max_length must keep them whole
            args.prompt_len = max(len(p["prompt"]) for p in pairs)
            args.response_len = 1 + max(len(p[k]) for p in pairs for k in ("chosen", "rejected"))
        else:
            pairs = bench_lib.make_pairs(n_pairs, args.vocab, args.prompt_len, args.response_len, jitter, seed)
        datasets[key] = bench_lib.write_data(pairs, directory)

    # The peak in the dtype the matmuls run in: bf16 under bf16-mixed / bf16-true.
    matmul_dtype = bench_lib.compute_dtype(args.precision)
    previous = Path(args.out_dir) / f"{name}.json"
    if args.resummarize and previous.is_file():  # the peak measured with the runs, not on today's machine load
        peak_flops = [json.loads(previous.read_text())["matmul_peak_flops"]]
    else:
        peak_flops = [bench_lib.matmul_peak_flops(matmul_dtype)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "LIGHTNING_PREF_CACHE": str(workdir / "cache"), "WANDB_DISABLED": "true", "PYTHONWARNINGS": "ignore"}
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    errors: dict[str, str] = {}
    (workdir / "logs").mkdir(exist_ok=True)
    started = time.time()
    for rep in range(args.repeats if not args.resummarize else 0):
        # A B C, C B A, A B C, ...: a linear drift of the machine's speed cancels over each pair of repetitions.
        for variant in variants if rep % 2 == 0 else variants[::-1]:
            if variant in errors:
                continue
            runner, lp_options, data_key, _ = VARIANTS[variant]
            tag = f"{variant}_rep{rep}"
            spec = {
                "runner": runner, "loss": args.loss, "model": config, "vocab": args.vocab, "tokenizer": str(tokenizer),
                "data": datasets[data_key], "ids": datasets[data_key]["ids"], "batch_size": args.batch_size,
                "prompt_len": args.prompt_len, "response_len": args.response_len, "steps": args.steps,
                "warmup": args.warmup, "lr": args.lr, "precision": args.precision, "lp": lp_options,
                "workdir": str(workdir),
                "run_dir": str(workdir / "runs" / tag), "result": str(workdir / "runs" / f"{tag}.json"),
            }
            Path(spec["run_dir"]).mkdir(parents=True, exist_ok=True)
            spec_path = workdir / "runs" / f"{tag}.spec.json"
            spec_path.write_text(json.dumps(spec))
            log = workdir / "logs" / f"{tag}.log"
            t = time.time()
            returncode = run_spec(spec_path, env, log, args.in_process)
            if returncode != 0 or not Path(spec["result"]).is_file():
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
                errors[variant] = f"exit {returncode}; log {log}:\n{tail}"
                print(f"[{tag}] FAILED (exit {returncode}), see {log}\n{tail}", file=sys.stderr)
                continue
            result = json.loads(Path(spec["result"]).read_text())
            runs[variant].append(result)
            print(f"[{tag}] {result['seconds_per_step'] * 1e3:8.1f} ms/step  "
                  f"train peak RSS {result['train_peak_rss_mb']:7.0f} MB  ({time.time() - t:.0f} s wall)", flush=True)
    if not args.resummarize:
        peak_flops.append(bench_lib.matmul_peak_flops(matmul_dtype))
    else:
        runs = {v: [json.loads(p.read_text()) for rep in range(args.repeats)
                    if (p := workdir / "runs" / f"{v}_rep{rep}.json").is_file()] for v in variants}

    summary = summarize(args, config, variants, runs, errors, max(peak_flops), n_pairs)
    summary["wall_seconds"] = time.time() - started
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(markdown(summary))
    print(markdown(summary))
    print(f"wrote {out_dir / (name + '.json')} and {out_dir / (name + '.md')}")
    return 1 if errors.get("floor") or errors.get("lp") else 0


def summarize(args, config, variants, runs, errors, peak_flops, n_pairs) -> dict[str, Any]:
    median = bench_lib.median
    floor_runs = runs.get("floor", [])
    trl_runs = runs.get("trl", [])
    flop_params = (floor_runs or next((r for r in runs.values() if r), [{}]))[0].get("params", {}).get("flop_params", 0)
    per_token = flops_per_token(args.loss, flop_params)
    out: dict[str, Any] = {
        "name": args.name, "loss": args.loss, "model_config": config, "vocab": args.vocab,
        "lengths": args.lengths, "batch_size_pairs": args.batch_size, "prompt_len": args.prompt_len, "response_len": args.response_len,
        "warmup_steps": args.warmup, "measured_steps": args.steps, "repeats": args.repeats, "lr": args.lr,
        "n_pairs": n_pairs, "precision": args.precision, "matmul_dtype": bench_lib.compute_dtype(args.precision),
        "peak_tflops": args.peak_tflops, "params": floor_runs[0]["params"] if floor_runs else None,
        "flops_note": ("*tokens/s*: the tokens of the step's sequences as a padded batch holds them (prompt + "
                       "response, pads left out), the same work for every variant. MFU: model FLOPs per token the "
                       "model runs on (pads and packing filler left out, a shared prompt once) = 8N (6N policy "
                       "fwd+bwd, 2N reference fwd)"
                       + (" + 4N (KTO KL rows: policy and reference fwd)" if args.loss == "kto" else "")
                       + "; N = all parameters except the input embedding table. The LM head is counted at every "
                       "token although lightning-pref applies it at response positions only, so its MFU overstates "
                       "the FLOPs it actually runs; attention FLOPs are not counted"),
        "matmul_peak_flops": peak_flops, "environment": bench_lib.environment(), "variants": {}, "errors": errors,
    }
    for variant in variants:
        rs = runs[variant]
        if not rs:
            continue
        sec = median([r["seconds_per_step"] for r in rs])
        tokens = median([r["tokens_per_step"] for r in rs])
        # the tokens the model runs on: padding and packing filler left out, a shared prompt once
        real = median([r["cells_per_step"] * (1 - r["pad_fraction"]) if "cells_per_step" in r
                       else r["tokens_per_step"] for r in rs])
        row = {
            "description": VARIANTS[variant][3],
            "seconds_per_step": sec,
            "seconds_per_step_runs": [r["seconds_per_step"] for r in rs],
            "tokens_per_step": tokens,
            "tokens_per_second": tokens / sec,
            "pairs_per_second": args.batch_size / sec,
            "pad_fraction": median([r["pad_fraction"] for r in rs]),
            "train_peak_rss_mb": median([r["train_peak_rss_mb"] for r in rs]),
            "peak_rss_mb": median([r["peak_rss_mb"] for r in rs]),
            "rss_at_train_start_mb": median([r["rss_at_train_start_mb"] for r in rs]),
            "real_tokens_per_step": real,
            "model_flops_per_second": real * per_token / sec,
            "mfu": real * per_token / sec / peak_flops,
        }
        if args.peak_tflops:
            row["mfu_vs_datasheet"] = real * per_token / sec / (args.peak_tflops * 1e12)
        if "reference_seconds_per_step" in rs[0]:  # model-mode reference timed inside lightning-pref's step
            row["reference_share_of_step"] = median([r["reference_seconds_per_step"] / r["seconds_per_step"] for r in rs])
        if "cuda_max_allocated_mb" in rs[0]:
            row["cuda_max_allocated_mb"] = median([r["cuda_max_allocated_mb"] for r in rs])
        # Paired ratios: repetition k of a variant against repetition k of the floor / TRL (run next to it).
        if floor_runs:
            row["time_vs_floor"] = median([r["seconds_per_step"] / f["seconds_per_step"]
                                           for r, f in zip(rs, floor_runs, strict=False)])
        if trl_runs:
            row["speedup_vs_trl"] = median([t["seconds_per_step"] / r["seconds_per_step"]
                                            for r, t in zip(rs, trl_runs, strict=False)])
            row["peak_rss_vs_trl"] = median([r["train_peak_rss_mb"] / t["train_peak_rss_mb"]
                                             for r, t in zip(rs, trl_runs, strict=False)])
        out["variants"][variant] = row
    if "lp" in runs and "lp_precomputed" in runs and runs["lp"] and runs["lp_precomputed"]:
        out["precomputed_speedup_vs_model_mode"] = median([a["seconds_per_step"] / b["seconds_per_step"]
                                                           for a, b in zip(runs["lp"], runs["lp_precomputed"], strict=False)])
    share = out["variants"].get("lp", {}).get("reference_share_of_step")
    if share is not None:  # dropping the reference forward and nothing else: the step shrinks by this share
        out["precomputed_speedup_bound"] = 1 / (1 - share)
    return out


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def markdown(s: dict[str, Any]) -> str:
    env = s["environment"]
    params = s["params"] or {}
    rows = s["variants"]
    gpu = any("cuda_max_allocated_mb" in r for r in rows.values())
    datasheet = bool(s.get("peak_tflops"))
    columns = ["variant", "s/step", "tokens/s", "pairs/s", "time vs floor", "speedup vs TRL", "train peak RSS (MB)",
               "process peak RSS (MB)"] + (["GPU peak allocated (MB)"] if gpu else []) + ["MFU"] + (
               [f"MFU vs {s['peak_tflops']:g} TFLOP/s"] if datasheet else []) + ["pad fraction"]
    lines = [
        f"# {s['name'] or 'train_step'}: {s['loss'].upper()} training step",
        "",
        f"Model: `{json.dumps(s['model_config'])}`, vocab {s['vocab']}, "
        f"{params.get('total', 0) / 1e6:.2f}M parameters ({params.get('flop_params', 0) / 1e6:.2f}M without the input embedding). "
        f"Batch {s['batch_size_pairs']} pairs{' (KTO: ' + str(2 * s['batch_size_pairs']) + ' unpaired examples + as many KL rows)' if s['loss'] == 'kto' else ''}, "
        + (f"prompt {s['prompt_len']} + response {s['response_len']} tokens" if s.get("lengths", "fixed") == "fixed" else
           f"lengths drawn from Anthropic HH's tokenized (prompt, chosen, rejected) counts (benchmarks/data/hh_lengths.json; "
           f"longest prompt {s['prompt_len']}, response {s['response_len']} tokens)")
        + f", precision {s['precision']}, AdamW lr {s['lr']}. "
        f"{s['warmup_steps']} warm-up + {s['measured_steps']} measured steps per run, {s['repeats']} alternating repetitions, medians.",
        "",
        f"Machine: {env['device']}, {env['cpu_count']} CPUs, torch {env['torch']} ({env['torch_threads']} threads), "
        f"lightning {env['lightning']}, transformers {env['transformers']}, trl {env['trl']}. "
        f"Measured {s['matmul_dtype']} matmul peak: {s['matmul_peak_flops'] / 1e9:,.1f} GFLOP/s.",
        "",
        "| " + " | ".join(columns) + " |",
        "|---|" + "---:|" * (len(columns) - 1),
    ]
    for name, r in rows.items():
        cells = [
            f"`{name}`", _fmt(r["seconds_per_step"], ".4f"), _fmt(r["tokens_per_second"], ",.0f"),
            _fmt(r["pairs_per_second"], ".1f"), _fmt(r.get("time_vs_floor"), ".2f") + "×",
            _fmt(r.get("speedup_vs_trl"), ".2f") + "×", _fmt(r["train_peak_rss_mb"], ",.0f"),
            _fmt(r["peak_rss_mb"], ",.0f"),
        ]
        cells += [_fmt(r.get("cuda_max_allocated_mb"), ",.0f")] if gpu else []
        cells += [_fmt(100 * r["mfu"], ".1f") + "%"]
        cells += [_fmt(100 * r["mfu_vs_datasheet"], ".1f") + "%"] if datasheet else []
        cells += [_fmt(r["pad_fraction"], ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Variants:", ""]
    lines += [f"- `{name}`: {r['description']}" for name, r in s["variants"].items()]
    if "precomputed_speedup_vs_model_mode" in s:
        lines += ["", f"Precomputed reference vs model mode: {s['precomputed_speedup_vs_model_mode']:.2f}× faster per step."]
    if "precomputed_speedup_bound" in s:
        share = s["variants"]["lp"]["reference_share_of_step"]
        lines += ["", f"The reference forward takes {100 * share:.1f}% of `lp`'s step (timed inside the run), so "
                      f"precomputing it can make a step at most {s['precomputed_speedup_bound']:.2f}× faster."]
    lines += [
        "",
        "*time vs floor* and *speedup vs TRL* are medians of per-repetition ratios (each repetition's runs are "
        "adjacent in time). *train peak RSS*: peak resident memory during the training steps (VmHWM reset when "
        "training starts; includes weights, reference and optimizer state); *process peak*: over the whole process "
        "(imports, data preparation, precompute pass). " + s["flops_note"] + ".",
    ]
    if s["errors"]:
        lines += ["", "Failed variants: " + ", ".join(f"`{k}`" for k in s["errors"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
