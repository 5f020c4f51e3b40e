"""A DPO step on a real checkpoint: step time and training peak memory per precision.

Runs ``lightning-pref fit --config configs/recipes/dpo.yaml`` on a real model directory (SmolLM2-135M-Instruct as
``tests/real.py`` converts it, by default) with batches of ``--batch-size`` pairs of exactly ``--prompt-len`` +
``--response-len`` tokens of real text (HH-RLHF transcripts as plain text, truncated; repeated to length where
short), each precision in its own process, gradient checkpointing as the recipe has it:

    python benchmarks/real_model.py                       # 32-true and bf16-mixed, batch 4 x (128 + 128)
    python benchmarks/real_model.py --precisions 32-true --steps 3 --warmup 1

Writes ``results/real_model_dpo.{json,md}``: seconds per optimizer step (after warm-up steps), tokens/s and the
training peak RSS (``VmHWM`` reset when training starts: weights, reference, optimizer state, activations).
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_lib  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: SmolLM2 from tests/real.py)")
    p.add_argument("--precisions", default="32-true,bf16-mixed")
    p.add_argument("--modules", default="dpo", help="dpo and/or reward (a reward model on the same body and data)")
    p.add_argument("--name", default=None, help="result file name (default: real_model_<modules>)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--response-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="measured optimizer steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gradient-checkpointing", default="true", choices=["true", "false"])
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--workdir", default=str(HERE / ".work" / "real_model"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def write_data(path: Path, n_pairs: int, prompt_chars: int, response_chars: int) -> None:
    """Plain-text pairs from HH transcripts, each field long enough to be truncated to its token budget."""
    from tests.real import hh_file

    rows = []
    with gzip.open(hh_file(), "rt", encoding="utf-8") as f:
        texts = [json.loads(line) for _, line in zip(range(4 * n_pairs), f, strict=False)]
    for i in range(n_pairs):
        a, b, c = texts[i]["chosen"], texts[i + n_pairs]["rejected"], texts[i + 2 * n_pairs]["chosen"]

        def long(text: str, chars: int) -> str:
            return (text * (chars // max(1, len(text)) + 1))[:chars]

        rows.append({"prompt": long(a, prompt_chars), "chosen": long(b, response_chars),
                     "rejected": long(c, response_chars)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def worker(spec: dict) -> dict:
    from lightning.pytorch import Callback

    from lightning_pref.cli import main

    clock = bench_lib.StepClock(spec["warmup"])

    class Measure(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            clock.memory.on_train_start()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            clock.batch(batch.attention_mask)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            clock.step_end()

    sys.modules["__main__"].Measure = Measure
    if spec["module"] == "reward":  # the demo's reward config on the real body, at a pretrained model's lr
        model = ["--config", str(HERE.parent / "configs/reward.yaml"), "--model.backbone", spec["model"],
                 "--model.tokenizer", "null", "--model.optimizer.init_args.lr", "1e-5"]
    else:
        model = ["--config", str(HERE.parent / "configs/recipes/dpo.yaml"), "--model.policy", spec["model"]]
    main([
        "fit", *model,
        "--data.train", spec["data"], "--data.val", "null", "--data.batch_size", str(spec["batch_size"]),
        "--data.max_length", str(spec["prompt_len"] + spec["response_len"]),
        "--data.max_prompt_length", str(spec["prompt_len"]), "--data.transcript", "none",
        "--trainer.precision", spec["precision"], "--trainer.accumulate_grad_batches", "1",
        "--trainer.max_steps", str(spec["warmup"] + spec["steps"]), "--checkpoint.save_last", "false", "--checkpoint.save_top_k", "0",
        "--model.gradient_checkpointing", spec["gradient_checkpointing"], "--trainer.logger", "false",
        "--trainer.default_root_dir", spec["root"], "--progress_bar.refresh_rate", "0",
        "--trainer.callbacks+=__main__.Measure",
    ])
    return clock.report()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        Path(spec["result"]).write_text(json.dumps(worker(spec)))
        return 0
    from tests.real import smollm2_dir

    model = args.model or str(smollm2_dir())
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    n_pairs = args.batch_size * (args.warmup + args.steps)
    data = work / "pairs.jsonl"
    write_data(data, n_pairs, prompt_chars=12 * args.prompt_len, response_chars=12 * args.response_len)
    results = {}
    for module in args.modules.split(","):
        for precision in args.precisions.split(","):
            run = f"{module}-{precision}"
            spec = {"model": model, "module": module, "data": str(data), "precision": precision,
                    "batch_size": args.batch_size, "prompt_len": args.prompt_len, "response_len": args.response_len,
                    "steps": args.steps, "warmup": args.warmup, "gradient_checkpointing": args.gradient_checkpointing,
                    "root": str(work / run), "result": str(work / f"{run}.json")}
            (work / f"{run}.spec.json").write_text(json.dumps(spec))
            with (work / f"{run}.log").open("w") as log:
                code = subprocess.run([sys.executable, __file__, "--worker", str(work / f"{run}.spec.json")],
                                      stdout=log, stderr=subprocess.STDOUT, cwd=str(HERE.parent)).returncode
            if code:
                print(f"{run}: failed (see {work / f'{run}.log'})")
                continue
            results[run] = json.loads(Path(spec["result"]).read_text())
            print(run, json.dumps(results[run]), flush=True)
    summary = {"model": model, "batch_size": args.batch_size, "prompt_len": args.prompt_len,
               "response_len": args.response_len, "steps": args.steps, "warmup": args.warmup,
               "gradient_checkpointing": args.gradient_checkpointing, "results": results,
               "environment": bench_lib.environment()}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or "real_model_" + "_".join(args.modules.split(","))
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2))
    lines = [
        f"# A training step on {Path(model).name}: batch {args.batch_size} pairs x ({args.prompt_len} + "
        f"{args.response_len}) tokens (DPO: configs/recipes/dpo.yaml; reward: configs/reward.yaml on the same body; "
        f"gradient checkpointing {args.gradient_checkpointing})", "",
        "| module | precision | s/step | tokens/s | train peak RSS (MB) |", "|---|---|---:|---:|---:|",
    ]
    for run, r in results.items():
        module, precision = run.split("-", 1)
        lines.append(f"| {module} | {precision} | {r['seconds_per_step']:.2f} | "
                     f"{r['tokens_per_step'] / r['seconds_per_step']:.0f} | {r['train_peak_rss_mb']:.0f} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
