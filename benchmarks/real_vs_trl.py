"""lightning-pref against TRL on a real checkpoint and real text: SmolLM2-135M-Instruct on Anthropic HH.

    python benchmarks/real_vs_trl.py                  # DPO and KTO, both length regimes, 3 alternating repetitions
    python benchmarks/real_vs_trl.py --regimes short --losses dpo --repeats 1 --steps 2     # a quick look
    python benchmarks/real_vs_trl.py --profile dpo:full   # torch.profiler of one lightning-pref step: phases, top ops

Each run is its own process, one thread (``torch.set_num_threads(1)``), and is measured by its *process CPU time*
per optimizer step (``time.process_time()``), with wall time beside it: on a shared machine wall time measures the
scheduler as much as the work. Systems alternate within a repetition (ours, TRL; then TRL, ours), and ratios are
taken per repetition, between runs that are next to each other in time.

Matched settings: the same model directory (``tests/real.py`` converts SmolLM2 once), fp32, gradient
checkpointing on in both (TRL's default), AdamW at the same constant learning rate without weight decay, gradient
norm clipped at 1.0 (TRL's default), beta 0.1, batches of ``--batch-size`` pairs (KTO: twice as many examples of
as many pairs, half of them desirable, half undesirable), the same batches in the same order (TRL's sequential sampler; lightning-pref's
file is written so that its seeded sampler yields that order), and the same conversations rendered by the same
chat template. No row is truncated by either: the regimes keep rows of at most ``--short-max`` (single-turn
prompts) or ``--full-max`` tokens (HH harmless as it is, multi-turn), and both max lengths are above that.

TRL runs in its own interpreter (``--trl-python``: a virtual environment with ``trl`` and this checkout
installed); lightning-pref runs through its CLI (``lightning_pref.cli.main(["fit", ...])``), as a user runs it.

Writes ``results/real_vs_trl.{json,md}``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

LN2 = math.log(2)
SAMPLER_SEED = 0  # lightning-pref's data.seed: its sampler's epoch-0 permutation is randperm(n, seed 0)
SYSTEMS = ("ours", "trl")
REGIMES = ("short", "full")
LOSSES = ("dpo", "kto")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: SmolLM2 as tests/real.py converts it)")
    p.add_argument("--data", default=None, help="HH file (default: ../shared/data, see tests/real.py)")
    p.add_argument("--regimes", default=",".join(REGIMES))
    p.add_argument("--losses", default=",".join(LOSSES))
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step (KTO: twice as many examples)")
    p.add_argument("--steps", type=int, default=4, help="measured optimizer steps per run")
    p.add_argument("--warmup", type=int, default=1, help="optimizer steps before the measured ones")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--short-max", type=int, default=128, help="short regime: single-turn rows of at most this many tokens")
    p.add_argument("--full-max", type=int, default=512, help="full regime: rows of at most this many tokens")
    p.add_argument("--gradient-checkpointing", default="true", choices=["true", "false"])
    p.add_argument("--ours-gradient-checkpointing", default=None, type=_checkpointing_arg,
                   help="lightning-pref's setting when it differs from TRL's (e.g. both at their defaults: false; "
                        "an integer n: every n-th decoder layer)")
    p.add_argument("--ours-checkpointing-method", default="uniform", choices=["uniform", "block"],
                   help="which layers lightning-pref's integer n recomputes: every n-th from the first "
                        "(uniform) or the bottom n (block; model.gradient_checkpointing_method)")
    p.add_argument("--seed", type=int, default=0, help="which rows are drawn")
    p.add_argument("--trl-python", default=os.environ.get("TRL_PYTHON"),
                   help="an interpreter with trl installed (default: $TRL_PYTHON, else this one if it has trl)")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--ours", default=None, metavar="JSON",
                   help="ablations: merged into lightning-pref's config, e.g. '{\"model\": {\"compile\": true}}'")
    p.add_argument("--name", default="real_vs_trl")
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--workdir", default=str(HERE / ".work" / "real_vs_trl"))
    p.add_argument("--profile", default=None, metavar="LOSS:REGIME",
                   help="instead: profile one measured lightning-pref step in this process (phases and top ops)")
    p.add_argument("--profile-out", default=None, help="--profile: also write the tables to this file")
    p.add_argument("--resummarize", action="store_true", help="rewrite the tables from the runs in --workdir")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ours_checkpointing_method == "block" and not (args.ours_gradient_checkpointing or "").isdigit():
        p.error("--ours-checkpointing-method block recomputes the bottom n layers: "
                "give --ours-gradient-checkpointing n")
    return args


# ----------------------------------------------------------------------------------------------------------- data
def hh_conversations(path: Path, tokenizer) -> list[dict[str, Any]]:
    """Every HH record as ``{prompt messages, chosen, rejected}`` (as lightning-pref parses transcripts), with
    token counts under the chat template: the prompt with its generation prompt, each response with its
    end-of-turn. Records whose responses are not one assistant message each (or are equal, or empty) are left out."""
    from lightning_pref.data.chat import split_shared_messages
    from lightning_pref.data.formats import _parse_transcript

    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            record = json.loads(line)
            try:
                chosen = _parse_transcript(record["chosen"], str(line_no), "chosen")
                rejected = _parse_transcript(record["rejected"], str(line_no), "rejected")
            except Exception:  # noqa: BLE001 - rows that do not parse are not benchmark material
                continue
            prompt, c, r = split_shared_messages(chosen, rejected)
            if not prompt or len(c) != 1 or len(r) != 1 or not c[0]["content"] or not r[0]["content"]:
                continue
            if c[0]["content"] == r[0]["content"]:
                continue
            text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            prompt_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            lengths = [len(tokenizer(m[0]["content"], add_special_tokens=False)["input_ids"]) + 1 for m in (c, r)]
            rows.append({"line": line_no, "prompt": prompt, "chosen": c, "rejected": r, "turns": len(prompt),
                         "prompt_tokens": prompt_tokens, "response_tokens": lengths})
    return rows


def regime_rows(rows: list[dict[str, Any]], regime: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The rows a regime draws from: ``short`` single-turn prompts within ``--short-max`` tokens, ``full`` every
    row within ``--full-max`` (the multi-turn HH distribution as it is)."""
    def total(r: dict[str, Any]) -> int:
        return r["prompt_tokens"] + max(r["response_tokens"])

    if regime == "short":  # one user turn after the template's default system turn
        return [r for r in rows if r["turns"] == 1 and total(r) <= args.short_max]
    return [r for r in rows if total(r) <= args.full_max]


def write_files(rows: list[dict[str, Any]], directory: Path, batch_size: int) -> dict[str, str]:
    """The drawn rows as conversational JSONL, once in batch order (TRL reads it sequentially) and once permuted so
    that lightning-pref's seeded sampler (``TrainSampler``, epoch 0) hands them out in the same order.

    DPO takes the first half of the rows, ``batch_size`` pairs a step. KTO takes all of them, ``2 * batch_size``
    examples a step from as many pairs (distinct prompts, as in shuffled unpaired data), alternately the chosen
    response as a desirable and the rejected one as an undesirable example."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    paired = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    unpaired = [{"prompt": p["prompt"], "completion": p["rejected" if i % 2 else "chosen"], "label": not i % 2}
                for i, p in enumerate(paired)]
    files = {}
    for loss, examples in (("dpo", paired[: len(paired) // 2]), ("kto", unpaired)):
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(SAMPLER_SEED)).tolist()
        permuted: list[Any] = [None] * len(examples)
        for position, row in enumerate(order):  # the sampler's position k yields file row order[k]
            permuted[row] = examples[position]
        for system, content in (("trl", examples), ("ours", permuted)):
            path = directory / f"{loss}_{system}.jsonl"
            path.write_text("".join(json.dumps(e) + "\n" for e in content))
            files[f"{loss}_{system}"] = str(path)
    return files


def prepare(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """Draw each regime's rows and write its files; returns what the runs and the tables need."""
    from transformers import AutoTokenizer

    from tests.real import hh_file

    tokenizer = AutoTokenizer.from_pretrained(model)
    path = Path(args.data) if args.data else hh_file()
    rows = hh_conversations(path, tokenizer)
    n = 2 * args.batch_size * (args.warmup + args.steps)  # DPO takes half of them (see write_files)
    out: dict[str, Any] = {"source": path.name, "parsed_rows": len(rows), "regimes": {}}
    for regime in args.regimes.split(","):
        pool = regime_rows(rows, regime, args)
        drawn = random.Random(args.seed).sample(pool, n)
        totals = sorted(r["prompt_tokens"] + max(r["response_tokens"]) for r in pool)
        drawn_totals = sorted(r["prompt_tokens"] + max(r["response_tokens"]) for r in drawn)
        out["regimes"][regime] = {
            "files": write_files(drawn, Path(args.workdir) / "data" / regime, args.batch_size),
            "pool_rows": len(pool), "drawn_rows": n, "dpo_pairs": n // 2, "lines": [r["line"] for r in drawn],
            "pool_sequence_p50_p90_max": [totals[len(totals) // 2], totals[int(0.9 * len(totals))], totals[-1]],
            "drawn_sequence_p50_p90_max": [drawn_totals[len(drawn) // 2], drawn_totals[int(0.9 * len(drawn))],
                                           drawn_totals[-1]],
            "drawn_median_prompt": statistics.median(r["prompt_tokens"] for r in drawn),
            "drawn_median_response": statistics.median(t for r in drawn for t in r["response_tokens"]),
            "drawn_multi_turn": sum(r["turns"] > 1 for r in drawn),
        }
    return out


# ------------------------------------------------------------------------------------------------------- workers
class Meter:
    """Per optimizer step: process CPU time, wall time, loss and token counts; training peak RSS."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float]] = []  # (process_time, perf_counter) at train start, then step ends
        self.losses: list[float] = []
        self.tokens: list[dict[str, int]] = []  # per batch, in order
        self.rss_start = 0.0
        self.reset_ok = False

    def start(self) -> None:
        from bench_lib import reset_peak_rss, rss_mb

        self.rss_start = rss_mb()
        self.reset_ok = reset_peak_rss()
        self.marks = [(time.process_time(), time.perf_counter())]

    def step_end(self) -> None:
        self.marks.append((time.process_time(), time.perf_counter()))

    def report(self, warmup: int) -> dict[str, Any]:
        from bench_lib import peak_rss_mb

        cpu = [b[0] - a[0] for a, b in zip(self.marks, self.marks[1:], strict=False)]
        wall = [b[1] - a[1] for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return {"cpu_step_seconds": cpu, "wall_step_seconds": wall, "warmup": warmup, "losses": self.losses,
                "tokens": self.tokens, "rss_at_train_start_mb": self.rss_start,
                "train_peak_rss_mb": peak_rss_mb() if self.reset_ok else float("nan")}


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)


def run_ours(spec: dict[str, Any], profile: dict[str, Any] | None = None) -> dict[str, Any]:
    """lightning-pref through its CLI, with a callback that measures every step."""
    _one_thread()
    import torch
    import yaml
    from lightning.pytorch import Callback

    from lightning_pref.cli import main

    meter = Meter()

    class Measure(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            meter.start()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            meter.tokens.append(_our_tokens(batch))
            if profile is not None and batch_idx == spec["warmup"]:
                profile["start"](pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            meter.step_end()
            meter.losses.append(float(outputs["loss"]))
            if profile is not None and batch_idx == spec["warmup"]:
                profile["stop"]()

    sys.modules["__main__"].Measure = Measure
    kto = spec["loss"] == "kto"
    root = Path(spec["run_dir"])
    root.mkdir(parents=True, exist_ok=True)
    config = {
        "seed_everything": 0,
        "trainer": {"max_steps": spec["warmup"] + spec["steps"], "precision": "32-true", "accelerator": "cpu",
                    "devices": 1, "gradient_clip_val": 1.0, "default_root_dir": str(root),
                    "callbacks": [{"class_path": "__main__.Measure"}]},
        "model": {"policy": spec["model"], "loss": {"class_path": spec["loss"], "init_args": {"beta": spec["beta"]}},
                  "optimizer": {"class_path": "torch.optim.AdamW",
                                "init_args": {"lr": spec["lr"], "weight_decay": 0.0}},
                  "gradient_checkpointing": spec["gradient_checkpointing"],
                  "gradient_checkpointing_method": spec["gradient_checkpointing_method"]},
        "data": {"train": spec["data"], "val": None, "batch_size": spec["batch_size"] * (2 if kto else 1),
                 "max_length": 1024, "seed": SAMPLER_SEED, "cache_dir": str(Path(spec["workdir"]) / "token_cache"),
                 },
        "checkpoint": {"save_last": False, "save_top_k": 0},
    }
    _merge(config, spec.get("ours") or {})
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(root / "config.yaml")])
    return {**meter.report(spec["warmup"]), "threads": torch.get_num_threads(), "environment": _environment()}


def _merge(into: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _our_tokens(batch) -> dict[str, int]:
    """Scored response tokens and the cells the model runs on, of a batch and of its KL rows."""
    packed = batch.packed
    if packed is not None:
        scored = int((packed.response_mask & (packed.position_ids > 0)).sum())
        cells, real = packed.input_ids.numel(), packed.real_tokens
    else:
        scored = int(batch.response_mask[:, 1:].sum())
        cells, real = batch.input_ids.numel(), int(batch.attention_mask.sum())
    out = {"response": scored, "cells": cells, "real": real}
    kl = batch.kl_rows
    if kl is not None:
        out["kl_response"] = int(kl.response_mask[:, 1:].sum())
        out["kl_cells"] = kl.packed.input_ids.numel() if kl.packed is not None else kl.input_ids.numel()
        out["kl_real"] = kl.packed.real_tokens if kl.packed is not None else int(kl.attention_mask.sum())
    return out


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL's DPOTrainer / KTOTrainer with the matched settings (see the module docstring), else its defaults."""
    _one_thread()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    kto = spec["loss"] == "kto"
    if kto:
        from trl import KTOConfig as Config
        from trl import KTOTrainer as Trainer
    else:
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    dataset = datasets.load_dataset("json", data_files=spec["data"], split="train",
                                    cache_dir=str(Path(spec["workdir"]) / "hf_datasets"))
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    meter = Meter()

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            meter.start()

        def on_step_end(self, args, state, control, **kwargs):
            meter.step_end()

    args = Config(
        output_dir=spec["run_dir"], per_device_train_batch_size=spec["batch_size"] * (2 if kto else 1),
        learning_rate=spec["lr"], lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
        max_steps=spec["warmup"] + spec["steps"], bf16=False, fp16=False,
        gradient_checkpointing=spec["gradient_checkpointing"], max_length=1024, beta=spec["beta"],
        train_sampling_strategy="sequential", report_to="none", save_strategy="no", logging_steps=10_000,
        seed=0, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, ref_model=reference, args=args, train_dataset=dataset, processing_class=tokenizer,
                      callbacks=[Clock()])
    collate = trainer.data_collator

    def counting_collator(examples):
        batch = collate(examples)
        tokens = {"response": int(batch["completion_mask"][:, 1:].sum()), "cells": batch["input_ids"].numel(),
                  "real": int(batch["attention_mask"].sum())}
        if "KL_input_ids" in batch:
            tokens.update(kl_response=int(batch["KL_completion_mask"][:, 1:].sum()),
                          kl_cells=batch["KL_input_ids"].numel(), kl_real=int(batch["KL_attention_mask"].sum()))
        meter.tokens.append(tokens)
        return batch

    trainer.data_collator = counting_collator
    compute_loss = trainer.compute_loss

    def recording_loss(model, inputs, *a, **k):
        out = compute_loss(model, inputs, *a, **k)
        if model.training:
            meter.losses.append(float((out[0] if isinstance(out, tuple) else out).detach()))
        return out

    trainer.compute_loss = recording_loss
    trainer.train()
    return {**meter.report(spec["warmup"]), "threads": torch.get_num_threads(), "environment": _environment()}


def _environment() -> dict[str, Any]:
    from bench_lib import environment

    return environment()


# ------------------------------------------------------------------------------------------------------- profile
def profile_step(args: argparse.Namespace, model: str, loss: str, regime: str) -> str:
    """One measured lightning-pref step under ``torch.profiler`` (CPU, one thread): its phases and top ops.

    The phases' CPU times are measured with ``time.process_time()`` around each (the profiler's own times are
    wall-clock, which a shared machine inflates); the ops table is the profiler's, as shares of its total."""
    from torch.profiler import ProfilerActivity, profile, record_function

    data = prepare(args, model)
    state: dict[str, Any] = {"phases": {}}

    def start(module) -> None:
        _label(module, record_function, state["phases"])
        state["prof"] = profile(activities=[ProfilerActivity.CPU])
        state["prof"].__enter__()
        state["t"] = time.process_time()

    def stop() -> None:
        state["cpu"] = time.process_time() - state["t"]
        state["prof"].__exit__(None, None, None)

    spec = _spec(args, model, data, loss, regime, "ours", 0)
    spec["steps"] = 1
    run_ours(spec, {"start": start, "stop": stop})
    events = state["prof"].key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    step = state["cpu"]
    phases = state["phases"]
    backward = phases.get("backward", 0.0)
    optimizer = phases.get("optimizer step", 0.0) - phases.get("training step", 0.0) - backward
    rows = [("policy forward (incl. its KL rows)", phases.get("policy forward", 0.0)),
            ("reference forward (incl. its KL rows)", phases.get("reference forward", 0.0)),
            ("  of which KL rows (policy + reference)", phases.get("KL rows", 0.0)),
            ("backward (incl. checkpointing's recompute)", backward),
            ("optimizer (AdamW, gradient clipping)", optimizer),
            ("rest (loss, logging, data, hooks)", step - phases.get("optimizer step", 0.0))]
    lines = [f"# One lightning-pref {loss.upper()} step, {regime} rows ({args.batch_size} pairs): {step:.2f} s process "
             "CPU under the profiler", "", "| phase | CPU s | share |", "|---|---:|---:|"]
    lines += [f"| {name} | {cpu:.2f} | {100 * cpu / step:.1f}% |" for name, cpu in rows]
    lines += ["", "| op (self time) | share | calls |", "|---|---:|---:|"]
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:20]:
        lines.append(f"| `{e.key}` | {100 * e.self_cpu_time_total / total:.1f}% | {e.count} |")
    return "\n".join(lines) + "\n"


def _label(module, record_function, phases: dict[str, float]) -> None:
    """Name the phases of a step in the profile and add up their process CPU time in ``phases`` (wrappers on the
    instances, for this process only)."""
    import functools

    def wrap(obj, attr, name):
        inner = getattr(obj, attr)

        @functools.wraps(inner)
        def labelled(*a, **k):
            start = time.process_time()
            try:
                with record_function(name):
                    return inner(*a, **k)
            finally:
                phases[name] = phases.get(name, 0.0) + time.process_time() - start

        setattr(obj, attr, labelled)

    wrap(module.policy, "forward", "policy forward")
    if hasattr(module.reference, "logps"):
        wrap(module.reference, "logps", "reference forward")
    for scorer in {id(s): s for s in (module.policy, module.reference)}.values():
        for method in ("score_kl_rows", "score_continuations"):  # apart in full, or on the recorded prompts
            if hasattr(scorer, method):
                wrap(scorer, method, "KL rows")
    wrap(module, "training_step", "training step")
    wrap(module, "backward", "backward")
    # Lightning runs the training step and backward inside the optimizer's step (its closure).
    wrap(module.trainer.optimizers[0], "step", "optimizer step")


# ----------------------------------------------------------------------------------------------------- orchestra
def _spec(args, model, data, loss, regime, system, rep) -> dict[str, Any]:
    work = Path(args.workdir)
    tag = f"{loss}_{regime}_{system}_rep{rep}"
    return {"system": system, "loss": loss, "regime": regime, "model": model,
            "data": data["regimes"][regime]["files"][f"{loss}_{system}"], "batch_size": args.batch_size,
            "steps": args.steps, "warmup": args.warmup, "lr": args.lr, "beta": args.beta,
            "gradient_checkpointing": _setting(_checkpointing(args, system)), "workdir": str(work),
            "gradient_checkpointing_method": (args.ours_checkpointing_method if system == "ours"
                                              else "uniform"),
            "ours": json.loads(args.ours) if args.ours else None,
            "run_dir": str(work / "runs" / tag), "result": str(work / "runs" / f"{tag}.json"), "tag": tag}


def _checkpointing(args: argparse.Namespace, system: str) -> str:
    return (args.ours_gradient_checkpointing or args.gradient_checkpointing) if system == "ours" else (
        args.gradient_checkpointing)


def _checkpointing_arg(value: str) -> str:
    """``true``, ``false`` or a whole number n >= 1 (lightning-pref's ``model.gradient_checkpointing``)."""
    if value in ("true", "false") or (value.isdigit() and int(value) >= 1):
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: true, false or an integer n >= 1 (every n-th layer)")


def _setting(value: str) -> bool | int:
    """The option's value: ``True``/``False``, or n (every n-th decoder layer recomputes)."""
    return int(value) if value.isdigit() else value == "true"


def run_one(spec: dict[str, Any], python: str, env: dict[str, str]) -> dict[str, Any] | None:
    work = Path(spec["workdir"])
    (work / "runs").mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    spec_path = work / "runs" / f"{spec['tag']}.spec.json"
    spec_path.write_text(json.dumps(spec))
    log = work / "logs" / f"{spec['tag']}.log"
    with log.open("w") as out:
        code = subprocess.run([python, str(Path(__file__).resolve()), "--worker", str(spec_path)], stdout=out,
                              stderr=subprocess.STDOUT, env=env, cwd=str(REPO)).returncode
    if code != 0 or not Path(spec["result"]).is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        print(f"[{spec['tag']}] FAILED (exit {code}), see {log}\n{tail}", file=sys.stderr, flush=True)
        return None
    return json.loads(Path(spec["result"]).read_text())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        result = (run_ours if spec["system"] == "ours" else run_trl)(spec)
        Path(spec["result"]).write_text(json.dumps(result))
        return 0
    os.environ.update(_ENV)
    from tests.real import smollm2_dir

    model = args.model or str(smollm2_dir())
    if args.profile:
        loss, regime = args.profile.split(":")
        args.regimes = regime
        text = profile_step(args, model, loss, regime)
        print(text)
        if args.profile_out:
            Path(args.profile_out).write_text(text)
        return 0
    systems = args.systems.split(",")
    trl_python = args.trl_python or (sys.executable if find_spec("trl") else None)
    if "trl" in systems and trl_python is None and not args.resummarize:  # rewriting the tables runs nothing
        print("no interpreter with trl: give --trl-python (or $TRL_PYTHON); running lightning-pref alone",
              file=sys.stderr)
        systems.remove("trl")
    data = prepare(args, model)
    machine = matmul_rate(model)  # before the runs, in this (otherwise idle) process
    # Rewriting the tables measures the rate again, apart from the runs: the tables say so.
    machine["measured"] = ("when these tables were rewritten from earlier runs (`--resummarize`), not beside them"
                           if args.resummarize else "before the runs")
    env = {**os.environ, **_ENV, "PYTHONPATH": str(REPO)}
    pythons = {"ours": sys.executable, "trl": trl_python}
    runs: dict[str, list[dict[str, Any]]] = {}
    started = time.time()
    for rep in range(0 if args.resummarize else args.repeats):
        order = systems if rep % 2 == 0 else systems[::-1]
        for regime in args.regimes.split(","):
            for loss in args.losses.split(","):
                for system in order:
                    spec = _spec(args, model, data, loss, regime, system, rep)
                    t = time.time()
                    result = run_one(spec, pythons[system], env)
                    if result is None:
                        continue
                    runs.setdefault(f"{loss}_{regime}_{system}", []).append(result)
                    print(f"[{spec['tag']}] {_cpu(result):6.2f} s CPU/step  {_wall(result):6.2f} s wall/step  "
                          f"step-0 loss {result['losses'][0]:.4f}  peak {result['train_peak_rss_mb']:,.0f} MB  "
                          f"({time.time() - t:.0f} s)", flush=True)
    if args.resummarize:
        for path in sorted((Path(args.workdir) / "runs").glob("*_rep*.json")):
            if not path.name.endswith(".spec.json"):
                key = path.stem.rsplit("_rep", 1)[0]
                runs.setdefault(key, []).append(json.loads(path.read_text()))
    summary = summarize(args, model, data, runs, systems, machine)
    summary["wall_seconds"] = time.time() - started
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0


_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_DISABLED": "true",
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
        "PYTHONWARNINGS": "ignore"}


def _measured(result: dict[str, Any], key: str) -> list[float]:
    return result[key][result["warmup"]:]


def _cpu(result: dict[str, Any]) -> float:
    return statistics.fmean(_measured(result, "cpu_step_seconds"))


def _wall(result: dict[str, Any]) -> float:
    return statistics.fmean(_measured(result, "wall_step_seconds"))


def _tokens(result: dict[str, Any], key: str) -> float:
    values = [t.get(key, 0) for t in result["tokens"][result["warmup"]:][: len(_measured(result, "cpu_step_seconds"))]]
    return statistics.fmean(values) if values else float("nan")


def matmul_rate(model: str) -> dict[str, Any]:
    """The model's matmul sizes and this machine's fp32 matmul rate on one thread (best of 5 one-second trials
    of a batch of 512 tokens through the model's widest linear layer): what :func:`dpo_matmul_bound` needs."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_layers import GradientCheckpointingLayer

    _one_thread()
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    head = lm.get_output_embeddings()
    linears = [m for m in lm.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    widest = max(linears, key=lambda m: m.weight.numel()).weight.shape
    x, w = torch.randn(512, widest[1]), torch.randn(*widest)
    best = 0.0
    for _ in range(5):
        n, start = 0, time.process_time()
        while time.process_time() - start < 1.0:
            torch.nn.functional.linear(x, w)
            n += 1
        best = max(best, 2 * x.shape[0] * w.numel() * n / (time.process_time() - start) / 1e9)
    # Backward's recompute of a checkpointed layer stops once it has the last tensor backward saves (torch's
    # non-reentrant checkpoint): the input of the layer's last linear, whose product only feeds the residual sum.
    layers = [m for m in lm.modules() if isinstance(m, GradientCheckpointingLayer)]
    last = [[m for m in layer.modules() if isinstance(m, torch.nn.Linear)][-1] for layer in layers]
    body = sum(m.weight.numel() for m in linears)
    return {"body_linear_parameters": body, "recomputed_linear_parameters": body - sum(m.weight.numel() for m in last),
            "head_parameters": head.weight.numel(), "vocab_size": head.weight.shape[0], "layers": len(layers),
            "matmul_gflops": best, "matmul_shape": [512, *widest]}


def _head_recomputed_rows(rows: int, vocab: int) -> int:
    """Rows whose logits the policy's head recomputes in backward: those before the trailing chunks it keeps
    (``lightning_pref.head``), scoring ``rows`` tokens in one pass."""
    from lightning_pref.head import chunks_kept, default_chunk_size

    chunk = default_chunk_size(vocab)
    sizes = [min(chunk, rows - start) for start in range(0, rows, chunk)]
    return sum(size for size, keep in zip(sizes, chunks_kept(sizes, vocab), strict=True) if not keep)


def dpo_matmul_bound(machine: dict[str, Any], ours: dict[str, Any], checkpointing: bool | int,
                     method: str = "uniform") -> dict[str, float]:
    """The matmul work of lightning-pref's DPO step and its time at ``machine``'s matmul rate: a lower bound on
    any implementation of the same passes over the same tokens (attention, norms, activations and the optimizer
    cost nothing in it). Every linear layer runs on each real token in the policy's forward, the reference's and
    backward (two matmuls); with checkpointing, backward's recompute runs each checkpointed layer's linears but its
    last (see :func:`matmul_rate`); the LM head on each scored token in the policy's forward, the reference's and
    backward's two matmuls, and again in backward on the tokens whose logits the head did not keep.
    ``checkpointing`` n: every n-th layer recomputes, from the first (``method`` uniform), or the bottom n
    (block), never the top one."""
    body = machine["body_linear_parameters"] * 4
    if checkpointing:
        n, layers = int(checkpointing), machine["layers"]
        recomputed = min(n, layers - 1) if method == "block" else len(range(0, layers - 1, n))
        body += machine["recomputed_linear_parameters"] * recomputed / layers
    head = machine["head_parameters"] * (4 * ours["response_tokens_per_step"] + _head_recomputed_rows(
        round(ours["response_tokens_per_step"]), machine["vocab_size"]))
    flops = 2 * (body * ours["real_tokens_per_step"] + head)
    seconds = flops / (machine["matmul_gflops"] * 1e9)
    return {"gflops_per_step": flops / 1e9, "bound_seconds_per_step": seconds,
            "ours_over_bound": ours["cpu_seconds_per_step"] / seconds}


def summarize(args, model, data, runs, systems, machine: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": args.name, "model": Path(model).name, "data": data, "batch_size_pairs": args.batch_size,
        "warmup_steps": args.warmup, "measured_steps": args.steps, "repeats": args.repeats, "lr": args.lr,
        "beta": args.beta, "gradient_checkpointing": {system: _checkpointing(args, system) for system in SYSTEMS},
        "gradient_checkpointing_method": args.ours_checkpointing_method,
        "precision": "fp32",
        "threads_per_process": 1, "machine": machine, "cases": {},
    }
    for regime in args.regimes.split(","):
        for loss in args.losses.split(","):
            case: dict[str, Any] = {}
            for system in systems:
                rs = runs.get(f"{loss}_{regime}_{system}", [])
                if not rs:
                    continue
                case[system] = {
                    "cpu_seconds_per_step": statistics.median(_cpu(r) for r in rs),
                    "wall_seconds_per_step": statistics.median(_wall(r) for r in rs),
                    "cpu_seconds_per_step_runs": [_cpu(r) for r in rs],
                    "wall_seconds_per_step_runs": [_wall(r) for r in rs],
                    "train_peak_rss_mb": statistics.median(r["train_peak_rss_mb"] for r in rs),
                    "rss_at_train_start_mb": statistics.median(r["rss_at_train_start_mb"] for r in rs),
                    "step0_losses": [r["losses"][0] for r in rs],
                    "response_tokens_per_step": _tokens(rs[0], "response"),
                    "kl_response_tokens_per_step": _tokens(rs[0], "kl_response"),
                    "cells_per_step": _tokens(rs[0], "cells") + _tokens(rs[0], "kl_cells"),
                    "real_tokens_per_step": _tokens(rs[0], "real") + _tokens(rs[0], "kl_real"),
                    "threads": rs[0].get("threads"),
                    "environment": rs[0].get("environment"),
                }
            ours, trl = runs.get(f"{loss}_{regime}_ours", []), runs.get(f"{loss}_{regime}_trl", [])
            if ours and trl:
                pairs = list(zip(ours, trl, strict=False))
                case["speedup_cpu_runs"] = [_cpu(t) / _cpu(o) for o, t in pairs]
                case["speedup_wall_runs"] = [_wall(t) / _wall(o) for o, t in pairs]
                case["speedup_cpu"] = statistics.median(case["speedup_cpu_runs"])
                case["speedup_wall"] = statistics.median(case["speedup_wall_runs"])
                case["peak_rss_vs_trl"] = case["ours"]["train_peak_rss_mb"] / case["trl"]["train_peak_rss_mb"]
            if machine and loss == "dpo" and "ours" in case:
                setting = _setting(_checkpointing(args, "ours"))
                case["matmul_bound"] = dpo_matmul_bound(machine, case["ours"], setting,
                                                        args.ours_checkpointing_method)
                if "trl" in case:
                    case["matmul_bound"]["trl_over_bound"] = (case["trl"]["cpu_seconds_per_step"]
                                                       / case["matmul_bound"]["bound_seconds_per_step"])
            if case:
                out["cases"][f"{loss}_{regime}"] = case
    return out


def markdown(s: dict[str, Any]) -> str:
    env = next((c[sys_]["environment"] for c in s["cases"].values() for sys_ in SYSTEMS if sys_ in c), {}) or {}
    trl_env = next((c["trl"]["environment"] for c in s["cases"].values() if "trl" in c), {}) or {}
    checkpointing = s["gradient_checkpointing"]
    if isinstance(checkpointing, dict):
        ours = checkpointing["ours"]
        if ours.isdigit():  # results written before the method was recorded are uniform
            ours = (f"{ours}, block (the bottom {ours} decoder layers recompute)"
                    if s.get("gradient_checkpointing_method") == "block" else
                    f"{ours} (one decoder layer in {ours} recomputes, from the first)")
        checkpointing = (f"{ours} in both" if len(set(checkpointing.values())) == 1 else
                         f"{ours} in lightning-pref, {checkpointing['trl']} in TRL")
    else:  # results written before the per-system setting
        checkpointing = f"{checkpointing} in both"
    lines = [
        f"# lightning-pref vs TRL on {s['model']}: Anthropic HH harmless, fp32, one thread per process",
        "",
        f"{s['batch_size_pairs']} pairs a step (KTO: {2 * s['batch_size_pairs']} examples of as many pairs, half "
        f"desirable (a chosen response), half undesirable (a rejected one), plus their KL rows); gradient checkpointing {checkpointing}; "
        f"AdamW lr {s['lr']:g} (constant), no weight decay, gradients clipped at norm 1.0; beta {s['beta']}; the same "
        f"batches in the same order; {s['warmup_steps']} warm-up + {s['measured_steps']} measured steps per run, "
        f"{s['repeats']} alternating repetitions. torch {env.get('torch')}, transformers {env.get('transformers')}, "
        f"lightning {env.get('lightning')}, trl {trl_env.get('trl')}; {env.get('cpu_count')} shared CPUs.",
        "",
    ]
    for regime, info in s["data"]["regimes"].items():
        p50, p90, top = info["drawn_sequence_p50_p90_max"]
        lines.append(
            f"- **{regime}**: {info['drawn_rows']} pairs drawn (DPO trains on {info['dpo_pairs']} of them) from "
            f"{info['pool_rows']} "
            + ("single-turn HH rows" if regime == "short" else "HH rows (all turns)")
            + f" of at most {max(info['pool_sequence_p50_p90_max'][2], top)} tokens; drawn: median prompt "
            f"{info['drawn_median_prompt']:.0f}, median response {info['drawn_median_response']:.0f}, longer sequence "
            f"of a pair p50/p90/max {p50}/{p90}/{top} tokens, {info['drawn_multi_turn']} multi-turn prompts."
        )
    lines += [
        "",
        "| case | lightning-pref CPU s/step | TRL CPU s/step | speedup (CPU) | per repetition | wall s/step ours / TRL "
        "| speedup (wall) | per repetition | train peak RSS ours / TRL (MB) | step-0 loss ours / TRL | response tokens "
        "per step ours / TRL |",
        "|---|---:|---:|---:|---|---:|---:|---|---:|---|---|",
    ]
    for name, c in s["cases"].items():
        o, t = c.get("ours"), c.get("trl")
        if o is None:
            continue

        def runs(key: str, case: dict[str, Any] = c) -> str:
            return ", ".join(f"{x:.2f}" for x in case.get(key, []))
        lines.append(
            f"| {name.replace('_', ', ')} | {o['cpu_seconds_per_step']:.2f} | "
            f"{t['cpu_seconds_per_step']:.2f} | **{c['speedup_cpu']:.2f}×** | {runs('speedup_cpu_runs')} | "
            f"{o['wall_seconds_per_step']:.2f} / {t['wall_seconds_per_step']:.2f} | {c['speedup_wall']:.2f}× | "
            f"{runs('speedup_wall_runs')} | {o['train_peak_rss_mb']:,.0f} / {t['train_peak_rss_mb']:,.0f} | "
            f"{_losses(o)} / {_losses(t)} | {tokens(o)} / {tokens(t)} |"
            if t else
            f"| {name} | {o['cpu_seconds_per_step']:.2f} | – | – | – | {o['wall_seconds_per_step']:.2f} / – | – | – | "
            f"{o['train_peak_rss_mb']:,.0f} / – | {_losses(o)} / – | {tokens(o)} / – |"
        )
    lines += ["", "Tokens the model runs on per step (all passes' inputs: padding and packing filler included / "
              "left out):", ""]
    for name, c in s["cases"].items():
        parts = [f"{system} {c[system]['cells_per_step']:,.0f} / {c[system]['real_tokens_per_step']:,.0f}"
                 for system in SYSTEMS if system in c]
        lines.append(f"- {name.replace('_', ', ')}: " + "; ".join(parts))
    bounds = {name: c["matmul_bound"] for name, c in s["cases"].items() if "matmul_bound" in c}
    if bounds and s.get("machine"):
        m = s["machine"]
        lines += ["", f"Matmul bound of lightning-pref's DPO step: its matmuls alone (every linear layer on each real "
                  "token in the policy's forward, the reference's, backward's two matmuls and, where checkpointing, "
                  "the recompute, which stops before each layer's last linear; the LM head on each scored token four "
                  "times, and a fifth on those whose logits it does not keep), at this machine's fp32 matmul rate "
                  f"on one thread ({m['matmul_gflops']:.1f} GFLOP/s, "
                  "best of 5 one-second trials of a "
                  f"{m['matmul_shape'][0]} x {m['matmul_shape'][2]} by {m['matmul_shape'][2]} x "
                  f"{m['matmul_shape'][1]} product, measured {m.get('measured', 'before the runs')}). No "
                  "implementation of the same passes over the same tokens runs faster; TRL's time over it bounds the "
                  "speedup they can reach:", ""]
        for name, f in bounds.items():
            bound = f" TRL / bound {f['trl_over_bound']:.2f}×" if "trl_over_bound" in f else ""
            lines.append(f"- {name.replace('_', ', ')}: {f['gflops_per_step']:.0f} GFLOP, bound "
                         f"{f['bound_seconds_per_step']:.2f} s/step; lightning-pref at {f['ours_over_bound']:.2f}× "
                         f"the bound;{bound}")
    lines += [
        "",
        "*CPU s/step*: process CPU time per measured optimizer step (`time.process_time()` between step ends, one "
        "thread per process), the median over repetitions; *wall*: the same steps' wall time. *speedup*: TRL's "
        "time over lightning-pref's, per repetition (runs next to each other in time), median in bold. *train "
        "peak RSS*: VmHWM reset when training starts (weights, reference, optimizer state, activations). "
        "*step-0 loss*: the first step's loss in each repetition (DPO: ln 2 = 0.6931 at the reference; KTO: 0.5). "
        "*response tokens*: scored tokens per step; TRL renders prompt + response with the chat template and "
        "scores everything after the prompt, so each of its responses also scores the newline the template "
        "writes after `<|im_end|>` (one token more per sequence than lightning-pref, which ends a response at "
        "its end-of-turn).",
    ]
    return "\n".join(lines) + "\n"


def tokens(r: dict[str, Any]) -> str:
    kl = r["kl_response_tokens_per_step"]
    return f"{r['response_tokens_per_step']:.0f}" + (f" + {kl:.0f} KL" if kl == kl and kl else "")


def _losses(r: dict[str, Any]) -> str:
    return ", ".join(f"{x:.4f}" for x in r["step0_losses"])


if __name__ == "__main__":
    sys.exit(main())
