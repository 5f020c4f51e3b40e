"""Host memory per rank under a multi-process strategy: what building the models costs each process.

    python benchmarks/host_memory.py                          # SmolLM2 (tests/real.py), FSDP2 and DDP, 2 CPU ranks
    python benchmarks/host_memory.py --model DIR --strategies fsdp2

Each rank records its peak resident set (``VmHWM``) once the models are built and sharded (``on_fit_start``) and
after one training step, and its resident set at that point. Written to ``results/host_memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_lib  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402


class RankMemory(Callback):
    """Writes ``<directory>/memory_rank<R>.json``: peak and current RSS after building, and after one step."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        self.seen: dict[str, float] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:  # runs before configure_model builds the models
        self.seen["before_build_rss_mb"] = bench_lib.rss_mb()
        self.seen["peak_reset"] = bench_lib.reset_peak_rss()

    def on_fit_start(self, trainer, pl_module) -> None:
        peak = bench_lib.peak_rss_mb()
        self.seen |= {"built_peak_mb": peak, "built_rss_mb": bench_lib.rss_mb(),
                      "build_added_peak_mb": peak - self.seen["before_build_rss_mb"]}

    def on_train_end(self, trainer, pl_module) -> None:
        self.seen |= {"step_peak_mb": bench_lib.peak_rss_mb(), "step_rss_mb": bench_lib.rss_mb()}
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"memory_rank{trainer.global_rank}.json").write_text(json.dumps(self.seen))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--strategies", default="fsdp2,ddp")
    p.add_argument("--workdir", default=str(HERE / ".work" / "host_memory"))
    p.add_argument("--out-dir", default=str(HERE / "results"))
    args = p.parse_args(argv)
    from tests.real import smollm2_dir

    model = args.model or str(smollm2_dir())
    work = Path(args.workdir)
    data = work / "pairs.jsonl"
    work.mkdir(parents=True, exist_ok=True)
    from lightning_pref.data.synthetic import generate

    data.write_text("".join(json.dumps(r) + "\n" for r in generate(16, seed=1)[0]))
    env = {**os.environ, "PYTHONPATH": f"{HERE}:{HERE.parent}", "HF_HUB_OFFLINE": "1"}
    results = {}
    for strategy in args.strategies.split(","):
        root = work / strategy
        shutil.rmtree(root, ignore_errors=True)  # the benchmark's own scratch directory
        command = [
            sys.executable, "-m", "lightning_pref", "fit", "--config", str(HERE.parent / "configs/recipes/dpo.yaml"),
            "--config", str(HERE.parent / f"configs/strategy/{strategy}.yaml"), "--trainer.devices", "2",
            "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--model.policy", model,
            "--model.gradient_checkpointing", "false", "--data.train", str(data), "--data.val", "null",
            "--data.transcript", "none", "--data.batch_size", "2", "--data.max_length", "96",
            "--trainer.accumulate_grad_batches", "1", "--trainer.max_steps", "1", "--trainer.logger", "false",
            "--checkpoint.save_last", "false", "--checkpoint.save_top_k", "0", "--progress_bar.refresh_rate", "0",
            "--trainer.default_root_dir", str(root), "--trainer.callbacks+=host_memory.RankMemory",
            f"--trainer.callbacks.directory={root}",
        ]
        with (work / f"{strategy}.log").open("w") as log:
            if subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode:
                print(f"{strategy}: failed, see {work / f'{strategy}.log'}")
                continue
        results[strategy] = [json.loads((root / f"memory_rank{r}.json").read_text()) for r in (0, 1)]
        print(strategy, results[strategy])
    out = Path(args.out_dir)
    (out / "host_memory.json").write_text(json.dumps({"model": model, "results": results,
                                                      "environment": bench_lib.environment()}, indent=2))
    lines = [f"# Host memory per rank, 2 CPU processes, {Path(model).name}, fp32, one DPO step", "",
             "| strategy | rank | RSS before building (MB) | peak while building (MB) | added by building (MB) | "
             "peak after a step (MB) |", "|---|---:|---:|---:|---:|---:|"]
    for strategy, ranks in results.items():
        for rank, r in enumerate(ranks):
            lines.append(f"| {strategy} | {rank} | {r['before_build_rss_mb']:.0f} | {r['built_peak_mb']:.0f} | "
                         f"{r['build_added_peak_mb']:.0f} | {r['step_peak_mb']:.0f} |")
    (out / "host_memory.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
