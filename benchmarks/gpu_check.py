"""GPU evidence in one run: correctness cases through the real CLI, then the ~0.5B bf16 performance tables.

    python benchmarks/gpu_check.py                  # on the GPU machine: <= 8 minutes, results under $OUT
    python benchmarks/gpu_check.py --dry-run        # CPU, tiny shapes, no perf: what CI runs (about a minute)
    python benchmarks/gpu_check.py --cases 'llama-*' --skip-perf     # a subset, e.g. to rerun what failed

**Correctness**: every case is a ``lightning-pref fit`` of a few steps on a randomly initialized tied Qwen2, a
Gemma2 with final-logit soft-capping and a sliding window, or a Llama (byte tokenizer, bundled data), run as
``python -m lightning_pref fit --config configs/<loss>.yaml --config <case>.yaml [--config
configs/strategy/<fsdp|fsdp2>.yaml] ...`` in its own process, output to a log file per case. Then, in a second
process, every case checks: each step's loss is finite; the step-0 loss is the loss at the reference (DPO ln 2,
KTO 0.5); ``lightning-pref export`` of its ``last.ckpt`` reloads with ``AutoModelForCausalLM.from_pretrained``,
keeps the architecture's config and generates; and the reloaded policy's sequence log-probs of a fixed batch
under the case's precision and attention (``SequenceScorer``) match fp32 eager attention. A failing case is
reported and the others run on.

**Performance** (not in ``--dry-run``): ``run_all.gpu_commands`` (the ``run_all.py --gpu`` tables) with fewer
steps and repetitions so that the whole script fits its budget: tokens/s, MFU against the measured bf16 matmul
peak and the datasheet (``--peak-tflops``), GPU peak memory; lightning-pref against the plain PyTorch floor and
TRL (when installed) in the same run.

Writes ``gpu_check.json`` and ``gpu_check.md`` (+ the tables' ``gpu_*.json``/``.md`` and the logs as
``gpu_check_logs.tar.gz``) to ``--out-dir``, else ``$OUT``, else ``benchmarks/results``; both are rewritten
after every case, so a run stopped early still leaves what it measured. See benchmarks/README.md ("GPU check").
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fnmatch
import inspect
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))  # this checkout's lightning_pref, as `python -m lightning_pref` from its root imports

import bench_lib  # noqa: E402
import run_all  # noqa: E402

LOSS_AT_REFERENCE = {"dpo": math.log(2), "kto": 0.5}  # policy == reference: DPO -log sigmoid(0), KTO 1 - sigmoid(0)
# |step-0 loss - loss at the reference|: policy and reference start from the same weights and run the same
# kernels, so the loss is ln 2 to rounding (measured on CPU: 2e-9). A compiled policy against the eager reference
# rounds differently in bf16 (measured 1.1e-3): 1e-2 is a chosen-minus-rejected margin of 0.2 nats at beta 0.1.
STEP0_TOLERANCE = 1e-3
STEP0_TOLERANCE_COMPILED = 1e-2
# max over the fixed batch's sequences of |log p(case) - log p(fp32)| / response tokens, in nats per token.
# Measured on CPU at this script's shapes, bf16 is off by 0.002-0.02 (8 bits of mantissa); a deliberately broken
# model (RoPE base changed, Gemma2's soft-cap dropped) by 0.05-0.4 in the dry-run shapes and 0.7-1.1 in the GPU ones.
LOGPS_TOLERANCE = {"bf16-mixed": 0.05, "bf16-true": 0.05}
# The check has teeth only if the model is far from uniform: a near-uniform model scores every token ~ -ln V
# whatever its kernels compute. Minimum mean |log p + ln V| per token of the fp32 reference.
LOGPS_MIN_SIGNAL = 0.1
GENERATE_TOKENS = 8
QUICK_PERF_MODEL = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128}


# ------------------------------------------------------------------------------------------------------- cases
def architectures(dry_run: bool) -> dict[str, dict[str, Any]]:
    """The random-init policies (``model.policy`` config dicts): tiny on CPU, small but GPU-sized otherwise.
    Gemma2's window is shorter than the sequences so its sliding-window layer really masks; it has 2+ layers,
    so both its sliding and its full-attention layer types run."""
    hidden, layers, heads, kv_heads, head_dim, window = (32, 2, 2, 1, 16, 16) if dry_run else (256, 4, 4, 2, 64, 32)
    # initializer_range: transformers' 0.02 leaves a random model's next-token distribution within ~0.01-0.1 nats
    # of uniform, where wrong attention or a wrong soft-cap barely changes a log-prob (see LOGPS_MIN_SIGNAL).
    common = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "max_position_embeddings": 256,
              "initializer_range": 0.2 if dry_run else 0.1}
    return {
        "qwen2": {"model_type": "qwen2", **common, "tie_word_embeddings": True},
        "gemma2": {"model_type": "gemma2", **common, "head_dim": head_dim, "query_pre_attn_scalar": head_dim,
                   "sliding_window": window, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
        "llama": {"model_type": "llama", **common, "tie_word_embeddings": False},
    }


@dataclass
class Case:
    """One ``lightning-pref fit`` run and its checks."""

    name: str
    arch: str
    loss: str
    precision: str
    group: str
    strategy: str | None = None  # configs/strategy/<strategy>.yaml
    attention: str | None = None  # model.model_kwargs.attn_implementation; None = transformers' default
    compile: bool = False
    packing: bool | None = None  # data.packing; None = not passed (padded batches)
    needs: tuple[str, ...] = ()  # "cuda", "flash_attn", "packing"

    def describe(self) -> str:
        parts = [f"{self.loss.upper()} on {self.arch}, {self.precision}"]
        parts += [f"strategy/{self.strategy}.yaml"] if self.strategy else []
        parts += [f"attention {self.attention}"] if self.attention else []
        parts += ["model.compile"] if self.compile else []
        parts += ["packed batches" if self.packing else "padded batches"]
        return ", ".join(parts)


def build_cases(packing_available: bool) -> list[Case]:
    """Every case, in report order. Cases that cannot run here are kept and reported as skipped."""
    padded = False if packing_available else None  # the option's default might pack: say padded explicitly
    archs = ("qwen2", "gemma2", "llama")
    cases = [Case(f"{a}-{loss}-{p}", a, loss, p, "precision", packing=padded)
             for a in archs for loss in ("dpo", "kto") for p in ("bf16-mixed", "bf16-true")]
    for strategy, needs in (("fsdp", ("cuda",)), ("fsdp2", ())):
        runs = [(a, "dpo") for a in archs] + [("llama", "kto")]
        cases += [Case(f"{a}-{loss}-bf16-mixed-{strategy}", a, loss, "bf16-mixed", strategy, strategy, packing=padded,
                       needs=needs) for a, loss in runs]
    # Gemma2 refuses sdpa (attention soft-capping): its explicit case is eager, its default.
    cases += [Case(f"{a}-dpo-bf16-mixed-{attn}", a, "dpo", "bf16-mixed", "attention", attention=attn, packing=padded)
              for a, attn in (("qwen2", "sdpa"), ("gemma2", "eager"), ("llama", "sdpa"))]
    cases += [Case(f"{a}-dpo-{p}-flash", a, "dpo", p, "attention", attention="flash_attention_2", packing=padded,
                   needs=("cuda", "flash_attn")) for a, p in (("qwen2", "bf16-true"), ("gemma2", "bf16-true"),
                                                                ("llama", "bf16-mixed"))]
    cases += [Case(f"{a}-dpo-bf16-mixed-compile", a, "dpo", "bf16-mixed", "compile", compile=True, packing=padded)
              for a in archs]
    cases += [Case(f"{a}-{loss}-bf16-mixed-packed", a, loss, "bf16-mixed", "packing", packing=True, needs=("packing",))
              for a, loss in [(a, "dpo") for a in archs] + [("llama", "kto")]]
    return cases


def packing_option_available() -> bool:
    """Whether this checkout's data module has ``data.packing`` (being added separately)."""
    from lightning_pref.data import PreferenceDataModule

    return "packing" in inspect.signature(PreferenceDataModule.__init__).parameters


def skip_reason(case: Case, args: argparse.Namespace, have: dict[str, bool]) -> str | None:
    """Why ``case`` does not run here, or ``None``."""
    if "cuda" in case.needs and not have["cuda"]:
        return "needs CUDA"
    if "flash_attn" in case.needs and not have["flash_attn"]:
        return "flash_attn not installed"
    if "packing" in case.needs and not have["packing"]:
        return "option not available (PreferenceDataModule has no data.packing)"
    if case.compile and args.dry_run and case.arch != "llama":
        return "dry run: compile on one architecture only (about a minute per compile on 2 CPU cores)"
    if args.cases and not any(fnmatch.fnmatch(case.name, p) for p in args.cases.split(",")):
        return "not selected (--cases)"
    if args.exclude and any(fnmatch.fnmatch(case.name, p) for p in args.exclude.split(",")):
        return "excluded (--exclude)"
    return None


# ----------------------------------------------------------------------------------------------- one case's run
def fit_argv(case: Case, args: argparse.Namespace, case_dir: Path) -> list[str]:
    """The ``lightning-pref fit`` arguments: the shipped loss config, the case's model, the shipped strategy
    config, then command-line options, as a user would combine them."""
    import yaml

    model: dict[str, Any] = {"policy": architectures(args.dry_run)[case.arch], "tokenizer": "byte"}
    if case.attention:
        model["model_kwargs"] = {"attn_implementation": case.attention}
    if case.compile:
        model["compile"] = True
    (case_dir / "case.yaml").write_text(yaml.safe_dump({"model": model}, sort_keys=False))
    argv = ["fit", "--config", str(REPO / "configs" / f"{case.loss}.yaml"), "--config", str(case_dir / "case.yaml")]
    if case.strategy:
        argv += ["--config", str(REPO / "configs" / "strategy" / f"{case.strategy}.yaml")]
    argv += [
        "--trainer.max_steps", str(args.steps), "--trainer.default_root_dir", str(case_dir / "run"),
        "--trainer.precision", case.precision, "--trainer.accelerator", "cpu" if args.dry_run else "gpu",
        "--trainer.devices", "1", "--trainer.log_every_n_steps", "1",
        "--trainer.limit_val_batches", "0",  # no sanity check or validation: the checks below are on training
        "--progress_bar.refresh_rate", "0",
        "--data.batch_size", str(args.batch_size), "--data.max_length", str(args.max_length),
    ]
    if case.packing is not None:
        argv += ["--data.packing", "true" if case.packing else "false"]
    return argv


def fixed_batch(tokenizer, lengths: list[int]):
    """Right-padded rows of deterministic text, the second half of each scored as response."""
    import random

    import torch

    rng = random.Random(0)
    rows = [tokenizer("".join(rng.choice("abcdefghij klmnopqrstuvwxyz.,") for _ in range(n)),
                      add_special_tokens=False)["input_ids"] for n in lengths]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    response = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        response[i, len(row) // 2 : len(row)] = True
    return ids, attention, response


def check_case(spec: dict[str, Any]) -> None:
    """The checks of one finished ``fit`` (in its own process), written to ``spec["result"]`` as JSON."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_pref.cli import main as cli_main
    from lightning_pref.logps import SequenceScorer

    result: dict[str, Any] = {"measured": {}, "failures": [], "warnings": [], "seconds": {}}
    measured, failures = result["measured"], result["failures"]

    def save() -> None:
        Path(spec["result"]).write_text(json.dumps(result, indent=1))

    @contextlib.contextmanager
    def step(name: str):
        start = time.perf_counter()
        try:
            yield
        except Exception as err:  # noqa: BLE001 - each check reports its own failure and the next one runs
            traceback.print_exc()
            failures.append(f"{name}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        finally:
            result["seconds"][name] = time.perf_counter() - start
            save()

    versions = sorted(Path(spec["run_dir"]).glob("lightning_logs/version_*"), key=lambda p: int(p.name.split("_")[1]))
    if not versions:
        failures.append("fit wrote no lightning_logs/version_* directory")
        save()
        return
    version = versions[-1]
    with step("losses"):
        with (version / "metrics.csv").open() as f:
            losses = [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]
        measured["losses"] = losses
        if len(losses) != spec["steps"]:
            raise AssertionError(f"{len(losses)} logged losses for {spec['steps']} steps")
        if not all(math.isfinite(v) for v in losses):
            raise AssertionError(f"non-finite loss: {losses}")
        expected = LOSS_AT_REFERENCE[spec["loss"]]
        measured["step0_loss_error"] = abs(losses[0] - expected)
        tolerance = STEP0_TOLERANCE_COMPILED if spec["compile"] else STEP0_TOLERANCE
        if measured["step0_loss_error"] > tolerance:
            raise AssertionError(f"step-0 loss {losses[0]:.6f}, expected {expected:.6f} +- {tolerance:g}")

    export = Path(spec["export_dir"])
    with step("export"):
        ckpt = version / "checkpoints" / "last.ckpt"
        try:
            cli_main(["export", "--ckpt_path", str(ckpt), "--output_dir", str(export), "--overwrite", "true"])
        except SystemExit as err:
            raise RuntimeError(f"lightning-pref export exited {err.code}") from None

    device = torch.device(spec["device"])
    # The fp32 side is true fp32: no TF32 matmuls, eager attention (the reference implementation).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    mixed = spec["precision"].endswith("-mixed")
    dtype = torch.float32 if mixed or spec["precision"] == "32-true" else torch.bfloat16
    attention = {"attn_implementation": spec["attention"]} if spec["attention"] else {}
    model = None
    with step("reload"):
        # The class the export saved: AutoTokenizer goes by config.json's model_type first (a qwen2 model
        # saved with the byte tokenizer comes back as an empty Qwen2Tokenizer), which is reported, not used.
        saved = json.loads((export / "tokenizer_config.json").read_text()).get("tokenizer_class")
        tokenizer = getattr(transformers, saved).from_pretrained(export) if saved else AutoTokenizer.from_pretrained(export)
        auto = AutoTokenizer.from_pretrained(export)
        probe = "The quick brown fox"
        if type(auto) is not type(tokenizer) or auto(probe)["input_ids"] != tokenizer(probe)["input_ids"]:
            result["warnings"].append(
                f"AutoTokenizer.from_pretrained(export) gives {type(auto).__name__}, not the saved {saved}; it "
                f"encodes {probe!r} to {len(auto(probe)['input_ids'])} tokens instead of {len(tokenizer(probe)['input_ids'])}")
        model = AutoModelForCausalLM.from_pretrained(export, dtype=dtype, **attention).to(device).eval()
        measured["attn_implementation"] = model.config._attn_implementation
        stored = model.config.to_dict()
        changed = {k: (v, stored.get(k)) for k, v in spec["policy"].items() if stored.get(k) != v}
        if changed:
            raise AssertionError(f"exported config differs from the trained one (trained, exported): {changed}")
        if spec["policy"].get("tie_word_embeddings"):
            tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
            measured["tied_after_reload"] = tied
            if not tied:
                raise AssertionError("tie_word_embeddings: the reloaded LM head is not the input embedding")

    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if mixed else contextlib.nullcontext()
    if model is None:
        return
    with step("generate"):
        prompt = tokenizer("The quick brown fox", return_tensors="pt").to(device)
        with torch.no_grad(), autocast:
            out = model.generate(**prompt, max_new_tokens=GENERATE_TOKENS, min_new_tokens=GENERATE_TOKENS,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new = out.shape[1] - prompt["input_ids"].shape[1]
        measured["generated"] = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])
        if new != GENERATE_TOKENS:
            raise AssertionError(f"generated {new} tokens, asked for {GENERATE_TOKENS}")

    with step("logps"):
        ids, mask, response = (t.to(device) for t in fixed_batch(tokenizer, spec["lengths"]))
        with torch.no_grad(), autocast:
            logps = SequenceScorer(model)(ids, mask, response)[0].double()
        del model
        reference = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32, attn_implementation="eager")
        with torch.no_grad():
            reference_logps = SequenceScorer(reference.to(device).eval())(ids, mask, response)[0].double()
        tokens = response[:, 1:].sum(-1).clamp(min=1)
        error = float(((logps - reference_logps).abs() / tokens).max())
        signal = float(((reference_logps + tokens * math.log(len(tokenizer))).abs() / tokens).mean())
        measured.update(logps_fp32=reference_logps.tolist(), logps=logps.tolist(), logps_error_per_token=error,
                        logps_signal_per_token=signal)
        tolerance = LOGPS_TOLERANCE[spec["precision"]]
        if not error <= tolerance:
            raise AssertionError(f"log-probs vs fp32: max error {error:.3g} nats/token > {tolerance:g}")
        if signal < LOGPS_MIN_SIGNAL:
            raise AssertionError(f"the fixed batch's log-probs are within {signal:.3g} nats/token of uniform: the "
                                 "comparison cannot tell a broken kernel from a correct one")


# --------------------------------------------------------------------------------------------------- launchers
def run_subprocess(argv: list[str], log: Path, timeout: float) -> int | None:
    """Run ``argv`` in a new process group, output to ``log``; the exit status, ``None`` if it timed out
    (the whole group is killed then: a compile worker or a launcher child must not outlive the case)."""
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


def run_forked(target: Callable[..., Any], args: tuple, log: Path, timeout: float, threads: int) -> int | None:
    """Run ``target(*args)`` in a forked child of this process, output to ``log``; exit status or ``None``.

    The CPU dry run's launcher: the child starts with ``lightning_pref.trainer_cli`` already imported, which
    saves the ~7 s import per process on 2 cores that a subprocess pays. Never used with CUDA (not fork-safe)."""
    proc = multiprocessing.get_context("fork").Process(target=_forked_child, args=(target, args, str(log), threads))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return None
    return proc.exitcode


def _forked_child(target: Callable[..., Any], args: tuple, log: str, threads: int) -> None:
    import torch

    # What OMP_NUM_THREADS does for a subprocess: torch was imported before the fork, so it is set here.
    torch.set_num_threads(threads)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)  # the file descriptors, so that native libraries' output lands in the log too
    os.dup2(fd, 2)
    code = 0
    try:
        target(*args)
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported through the exit status and the log
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no atexit handlers or buffers of the parent's run twice


def _cli(argv: list[str]) -> None:
    from lightning_pref.cli import main

    main(argv)


def _check_from_file(spec_path: str) -> None:
    check_case(json.loads(Path(spec_path).read_text()))


def run_case(case: Case, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Fit, then check, each in its own process; the case's report row."""
    case_dir = workdir / "cases" / case.name
    case_dir.mkdir(parents=True)
    argv = fit_argv(case, args, case_dir)
    row: dict[str, Any] = {"command": "python -m lightning_pref " + " ".join(argv), "log": str(case_dir / "fit.log")}
    fork = args.launcher == "fork"
    start = time.perf_counter()
    if fork:
        code = run_forked(_cli, (argv,), case_dir / "fit.log", args.case_timeout, args.threads)
    else:
        code = run_subprocess([sys.executable, "-m", "lightning_pref", *argv], case_dir / "fit.log", args.case_timeout)
    row["fit_seconds"] = time.perf_counter() - start
    if code != 0:
        return {**row, "status": "failed", "failures": [f"fit {'timed out' if code is None else f'exited {code}'}"],
                "log_tail": tail(case_dir / "fit.log")}
    spec = {"name": case.name, "loss": case.loss, "precision": case.precision, "attention": case.attention,
            "compile": case.compile,
            "policy": architectures(args.dry_run)[case.arch], "steps": args.steps, "run_dir": str(case_dir / "run"),
            "export_dir": str(case_dir / "exported"), "result": str(case_dir / "check.json"),
            "device": "cpu" if args.dry_run else "cuda", "lengths": args.lengths}
    (case_dir / "check_spec.json").write_text(json.dumps(spec))
    start = time.perf_counter()
    if fork:
        code = run_forked(_check_from_file, (str(case_dir / "check_spec.json"),), case_dir / "check.log",
                          args.case_timeout, args.threads)
    else:
        code = run_subprocess([sys.executable, str(Path(__file__).resolve()), "--check-worker",
                               str(case_dir / "check_spec.json")], case_dir / "check.log", args.case_timeout)
    row["check_seconds"] = time.perf_counter() - start
    checked = json.loads((case_dir / "check.json").read_text()) if (case_dir / "check.json").is_file() else {}
    failures = list(checked.get("failures", []))
    if code != 0:
        failures.append(f"check {'timed out' if code is None else f'exited {code}'}")
    row.update(measured=checked.get("measured", {}), check_step_seconds=checked.get("seconds", {}), failures=failures,
               warnings=checked.get("warnings", []), status="failed" if failures else "passed")
    if failures:
        row["log_tail"] = tail(case_dir / "check.log")
    return row


def _case_runner(case: Case, args: argparse.Namespace, workdir: Path) -> None:
    """A case in its own forked process (single-threaded parent: safe to fork), its row written as JSON."""
    try:
        row = run_case(case, args, workdir)
    except Exception as err:  # noqa: BLE001 - one broken case must not stop the report
        row = {"status": "failed", "failures": [f"gpu_check: {type(err).__name__}: {err}"],
               "log_tail": traceback.format_exc()}
    (workdir / "cases" / case.name / "row.json").write_text(json.dumps(row))


def run_cases(cases: list[Case], args: argparse.Namespace, workdir: Path, deadline: float | None,
              done: Callable[[Case, dict[str, Any]], None]) -> None:
    """Run ``cases``, ``args.jobs`` at a time, each in a forked runner process (which starts the case's stages
    with the launcher and never touches CUDA), calling ``done`` in this process as each one ends."""
    context = multiprocessing.get_context("fork")
    queue, running = list(cases), {}
    while queue or running:
        while queue and len(running) < args.jobs:
            case = queue.pop(0)
            if deadline is not None and time.time() > deadline:
                done(case, {"status": "skipped", "reason": "time budget (--budget minus --perf-reserve) used up "
                                                           "before it started"})
                continue
            proc = context.Process(target=_case_runner, args=(case, args, workdir))
            proc.start()
            running[proc.sentinel] = (case, proc)
        for sentinel in multiprocessing.connection.wait(list(running)):
            case, proc = running.pop(sentinel)
            proc.join()
            path = workdir / "cases" / case.name / "row.json"
            row = json.loads(path.read_text()) if path.is_file() else {
                "status": "failed", "failures": [f"gpu_check: case runner exited {proc.exitcode}"]}
            done(case, row)


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""


# ------------------------------------------------------------------------------------------------- performance
def run_perf(args: argparse.Namespace, out_dir: Path, workdir: Path, deadline: float | None) -> dict[str, Any]:
    """The GPU tables of ``run_all.py --gpu`` with this script's step counts, each within the time left."""
    trl = find_spec("trl") is not None
    perf: dict[str, Any] = {
        "trl_installed": trl,
        "note": None if trl else "TRL is not installed: no TRL rows (pip install 'trl>=1.16' to compare)",
        "settings": {"steps": args.perf_steps, "warmup": args.perf_warmup, "repeats": args.perf_repeats,
                     "options_repeats": args.perf_options_repeats, "peak_tflops": args.peak_tflops},
        "tables": {},
    }
    # --quick-perf: the same commands on a tiny model (train_step takes the last of a repeated option), in one
    # process, main table only: the perf plumbing runs in the CPU dry run, its numbers mean nothing.
    quick = ["--model-config", json.dumps(QUICK_PERF_MODEL), "--vocab", "256", "--batch-size", "2", "--prompt-len", "8",
             "--response-len", "8", "--in-process", "--no-trl"] if args.quick_perf else []
    extra = {name: ["--out-dir", str(out_dir), "--workdir", str(workdir / "perf" / name), *quick]
             for name in run_all.GPU_TABLES}
    commands = run_all.gpu_commands(args.peak_tflops, args.perf_steps, args.perf_warmup, args.perf_repeats,
                                    0 if args.quick_perf else args.perf_options_repeats, extra)
    for command in commands:
        name = command[command.index("--name") + 1]
        table: dict[str, Any] = {"command": "python benchmarks/" + " ".join(command)}
        perf["tables"][name] = table
        left = None if deadline is None else deadline - time.time()
        if left is not None and left < 30:
            table.update(status="skipped", reason="time budget (--budget) used up")
            continue
        print(f"+ {table['command']}", flush=True)
        log = workdir / "logs" / f"perf_{name}.log"
        start = time.perf_counter()
        code = run_subprocess([sys.executable, str(HERE / command[0]), *command[1:]], log, left or 24 * 3600)
        table["seconds"] = time.perf_counter() - start
        result = out_dir / f"{name}.json"
        if code is None or not result.is_file():
            table.update(status="failed", reason="timed out" if code is None else f"exited {code}", log_tail=tail(log))
            continue
        summary = json.loads(result.read_text())
        keys = ("seconds_per_step", "tokens_per_second", "mfu", "mfu_vs_datasheet", "cuda_max_allocated_mb",
                "time_vs_floor", "speedup_vs_trl", "description")
        table.update(status="passed" if code == 0 and not summary.get("errors") else "failed",
                     matmul_peak_tflops=summary["matmul_peak_flops"] / 1e12, params=summary.get("params"),
                     errors={k: v.splitlines()[0] for k, v in summary.get("errors", {}).items()},
                     variants={v: {k: row.get(k) for k in keys} for v, row in summary["variants"].items()},
                     files=[f"{name}.json", f"{name}.md"])
    return perf


# ------------------------------------------------------------------------------------------------------ report
def write_report(report: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = report["cases"]
    report["summary"] = {s: sum(c["status"] == s for c in cases) for s in ("passed", "failed", "skipped", "pending")}
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "gpu_check.md").write_text(markdown(report))


def _num(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(report: dict[str, Any]) -> str:
    env, s, cases = report["environment"], report["summary"], report["cases"]
    lines = [
        f"# GPU check ({report['mode']})", "",
        f"Device: **{env.get('device')}**; torch {env.get('torch')} (CUDA {env.get('cuda')}), transformers "
        f"{env.get('transformers')}, lightning {env.get('lightning')}, trl {env.get('trl')}, flash_attn "
        f"{env.get('flash_attn')}; python {env.get('python')}, {env.get('cpu_count')} CPUs. Commit {env.get('commit')}.",
        "",
        f"{s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped" + (f", {s['pending']} pending"
                                                                                 if s["pending"] else "")
        + f" in {_num(report.get('wall_seconds'), '.0f')} s ({report['settings']['launcher']} launcher, "
        f"{report['settings']['jobs']} at a time, {report['settings']['steps']} steps per case).",
        "",
        "Tolerances: " + "; ".join(f"{k}: {v}" for k, v in report["tolerances"].items()) + ".",
        "",
        "| case | status | what | step-0 loss − reference | log-probs vs fp32 (nats/token) | of signal (nats/token) | attention | fit s | check s | note |",
        "|---|---|---|---:|---:|---:|---|---:|---:|---|",
    ]
    for c in cases:
        m = c.get("measured", {})
        note = c.get("reason") or "; ".join(c.get("failures", []))
        note += "".join(f" (warning: {w})" for w in c.get("warnings", []))
        lines.append(f"| `{c['name']}` | {c['status']} | {c['description']} | {_num(m.get('step0_loss_error'), '.1e')} | "
                     f"{_num(m.get('logps_error_per_token'), '.4f')} | {_num(m.get('logps_signal_per_token'), '.2f')} | "
                     f"{m.get('attn_implementation', '–')} | "
                     f"{_num(c.get('fit_seconds'), '.1f')} | {_num(c.get('check_seconds'), '.1f')} | {note} |")
    perf = report.get("perf", {})
    lines += ["", "## Performance", ""]
    if perf.get("status") == "skipped":
        lines.append(f"Skipped: {perf['reason']}.")
    for name, table in perf.get("tables", {}).items():
        lines += [f"### `{name}` ({table.get('status')})", "", f"`{table['command']}`", ""]
        if "variants" not in table:
            lines += [f"{table.get('reason', '')}", ""]
            continue
        peak = perf["settings"]["peak_tflops"]
        lines += [f"Measured bf16 matmul peak {table['matmul_peak_tflops']:.3g} TFLOP/s; datasheet {peak} TFLOP/s.", "",
                  f"| variant | s/step | tokens/s | MFU (measured peak) | MFU ({peak} TFLOP/s) | GPU peak MB | time vs floor (×) | speedup vs TRL (×) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for v, r in table["variants"].items():
            pct = [_num(None if r.get(k) is None else 100 * r[k], ".1f") + "%" for k in ("mfu", "mfu_vs_datasheet")]
            lines.append(f"| `{v}` | {_num(r['seconds_per_step'], '.3f')} | {_num(r['tokens_per_second'], ',.0f')} | "
                         f"{pct[0]} | {pct[1]} | {_num(r.get('cuda_max_allocated_mb'), ',.0f')} | "
                         f"{_num(r.get('time_vs_floor'), '.2f')} | {_num(r.get('speedup_vs_trl'), '.2f')} |")
        if table.get("errors"):
            lines.append("\nFailed variants: " + "; ".join(f"`{k}`: {v}" for k, v in table["errors"].items()))
        lines.append("")
    if perf.get("note"):
        lines += [perf["note"] + "."]
    failed = [c for c in cases if c["status"] == "failed"]
    if failed:
        lines += ["", "## Failures", ""]
        for c in failed:
            lines += [f"### `{c['name']}`", "", f"`{c['command']}`", "", "```", c.get("log_tail", ""), "```", ""]
    return "\n".join(lines) + "\n"


def environment(dry_run: bool) -> dict[str, Any]:
    import torch

    info = bench_lib.environment()
    info["cuda"] = torch.version.cuda
    try:
        from importlib.metadata import version

        info["flash_attn"] = version("flash_attn")
    except Exception:  # noqa: BLE001 - not installed
        info["flash_attn"] = None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    info["commit"] = commit.stdout.strip() or None
    info["dry_run"] = dry_run
    return info


# -------------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, no perf section")
    p.add_argument("--out-dir", default=None, help="results folder (default: $OUT, else benchmarks/results)")
    p.add_argument("--workdir", default=None, help="runs, exports and logs (default: benchmarks/.work/gpu_check)")
    p.add_argument("--cases", default=None, help="comma-separated globs of case names to run (others: skipped)")
    p.add_argument("--exclude", default=None, help="comma-separated globs of case names not to run")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per case (default: 2 dry run, 3 GPU)")
    p.add_argument("--batch-size", type=int, default=None, help="data.batch_size (default: 4 dry run, 8 GPU)")
    p.add_argument("--max-length", type=int, default=None, help="data.max_length (default: 64 dry run, 128 GPU)")
    p.add_argument("--launcher", choices=["auto", "subprocess", "fork"], default="auto",
                   help="auto: fork in the dry run (one import for all cases), else one subprocess per stage")
    p.add_argument("--jobs", type=int, default=None, help="cases at a time (default: 6 on GPU, the CPU count up to 2 "
                                                       "in the dry run)")
    p.add_argument("--case-timeout", type=float, default=300, help="seconds per case stage (fit, check)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole script (default 480 on GPU, none in the dry run): no case starts "
                        "after budget - perf-reserve, and the perf tables get what is left")
    p.add_argument("--perf-reserve", type=float, default=270, help="seconds kept for the perf tables")
    p.add_argument("--skip-perf", action="store_true")
    p.add_argument("--quick-perf", action="store_true",
                   help="with --dry-run: the perf commands on a tiny model, 1 step, main table only (tests the plumbing)")
    p.add_argument("--perf-steps", type=int, default=8)
    p.add_argument("--perf-warmup", type=int, default=2)
    p.add_argument("--perf-repeats", type=int, default=2, help="repetitions of the main table (floor, lp, precomputed, trl)")
    p.add_argument("--perf-options-repeats", type=int, default=1, help="of the options table (gc, compile); 0 = skip")
    p.add_argument("--peak-tflops", default="989", help="datasheet bf16 dense peak (H100/H200 SXM: 989)")
    p.add_argument("--check-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps or (2 if args.dry_run else 3)
    args.batch_size = args.batch_size or (4 if args.dry_run else 8)
    args.max_length = args.max_length or (64 if args.dry_run else 128)
    # Fixed-batch lengths (characters = byte tokens): past Gemma2's window (16 / 32), within max positions.
    args.lengths = [24, 40, 56, 64] if args.dry_run else [40, 72, 100, 128]
    if args.launcher == "auto":
        args.launcher = "fork" if args.dry_run else "subprocess"
    if args.launcher == "fork" and not args.dry_run:
        p.error("--launcher fork is for the CPU dry run: CUDA is not fork-safe")
    cpus = os.cpu_count() or 2
    args.jobs = args.jobs or (min(2, cpus) if args.dry_run else min(6, max(1, cpus // 2)))
    args.threads = max(1, cpus // args.jobs)  # per case: parallel cases share the CPU, no oversubscription
    if args.budget is None and not args.dry_run:
        args.budget = 480.0
    if args.quick_perf:
        if not args.dry_run:
            p.error("--quick-perf is for the dry run (tiny shapes)")
        args.perf_steps, args.perf_warmup, args.perf_repeats = 1, 1, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.check_worker:
        _check_from_file(args.check_worker)
        return 0
    started = time.time()
    out_dir = Path(args.out_dir or os.environ.get("OUT") or HERE / "results").resolve()
    workdir = Path(args.workdir or HERE / ".work" / "gpu_check").resolve()
    import shutil

    shutil.rmtree(workdir / "cases", ignore_errors=True)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    os.environ.update({
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "LIGHTNING_PREF_CACHE": str(workdir / "cache"), "HF_DATASETS_CACHE": str(workdir / "hf_datasets"),
        "PYTHONUNBUFFERED": "1", "WANDB_DISABLED": "true",
        # `python -m lightning_pref` from this checkout, installed or not.
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    })
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # subprocesses; forked children: run_forked
    import torch

    if args.launcher == "fork":
        import lightning_pref.trainer_cli  # noqa: F401 - the training stack, once, before the forks
    elif not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device; run with --dry-run on a machine without one", file=sys.stderr)
        return 2
    have = {"cuda": not args.dry_run, "flash_attn": find_spec("flash_attn") is not None,
            "packing": packing_option_available()}
    cases = build_cases(have["packing"])
    if args.list:
        for case in cases:
            reason = skip_reason(case, args, have)
            print(f"{case.name:36} {case.describe()}" + (f"  [skipped: {reason}]" if reason else ""))
        return 0
    report: dict[str, Any] = {
        "mode": "dry-run (CPU)" if args.dry_run else "GPU",
        "environment": {"device": "(measured at the end)"},
        "settings": {k: getattr(args, k) for k in ("steps", "batch_size", "max_length", "launcher", "jobs", "budget",
                                                   "perf_reserve", "lengths", "case_timeout")},
        "architectures": architectures(args.dry_run),
        "tolerances": {"step-0 loss (DPO ln 2, KTO 0.5), absolute": STEP0_TOLERANCE,
                       "step-0 loss, compiled policy vs eager reference": STEP0_TOLERANCE_COMPILED,
                       **{f"log-probs vs fp32 eager, max |error| nats/token, {k}": v for k, v in LOGPS_TOLERANCE.items()},
                       "fixed batch's fp32 log-probs from uniform, min mean nats/token": LOGPS_MIN_SIGNAL},
        "packing_option_available": have["packing"],
        "cases": [{"name": c.name, "group": c.group, "description": c.describe(), "status": "pending"} for c in cases],
    }
    rows = {r["name"]: r for r in report["cases"]}
    runnable = []
    for case in cases:
        reason = skip_reason(case, args, have)
        if reason:
            rows[case.name].update(status="skipped", reason=reason)
        else:
            runnable.append(case)
    write_report(report, out_dir)
    case_deadline = None if args.budget is None else started + args.budget - (0 if args.skip_perf else args.perf_reserve)

    def done(case: Case, row: dict[str, Any]) -> None:
        rows[case.name].update(row)
        print(f"[{time.time() - started:6.0f} s] {case.name}: {row['status']} "
              f"{row.get('reason') or '; '.join(row.get('failures', []))}", flush=True)
        report["wall_seconds"] = time.time() - started
        write_report(report, out_dir)

    # Longest first, so that no compile case is the tail of a parallel run.
    run_cases(sorted(runnable, key=lambda c: (not c.compile, c.strategy is None)), args, workdir, case_deadline, done)

    report["environment"] = environment(args.dry_run)  # after the forks: it initializes CUDA
    if args.skip_perf or (args.dry_run and not args.quick_perf):
        report["perf"] = {"status": "skipped", "reason": "--skip-perf" if args.skip_perf else "dry run"}
    else:
        report["perf"] = {"status": "running"}
        write_report(report, out_dir)
        report["perf"] = run_perf(args, out_dir, workdir, None if args.budget is None else started + args.budget)
    report["wall_seconds"] = time.time() - started
    write_report(report, out_dir)
    with tarfile.open(out_dir / "gpu_check_logs.tar.gz", "w:gz") as tar:  # one file: $OUT returns at most 8
        for path in sorted(workdir.glob("cases/*/*")) + sorted((workdir / "logs").glob("*.log")):
            if path.is_file() and path.suffix in (".log", ".yaml", ".json"):
                tar.add(path, arcname=str(path.relative_to(workdir)))
    print((out_dir / "gpu_check.md").read_text())
    print(f"wrote {out_dir / 'gpu_check.json'} and {out_dir / 'gpu_check.md'}")
    return 1 if report["summary"]["failed"] or any(t.get("status") == "failed"
                                                     for t in report["perf"].get("tables", {}).values()) else 0


if __name__ == "__main__":
    sys.exit(main())
