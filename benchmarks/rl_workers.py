"""One RL-step benchmark run per process: lightning-pref's ``PolicyGradientModule``, TRL's ``GRPOTrainer`` /
``RLOOTrainer``, and the SmolLM2 PPO check.

``rl_step.py`` writes a spec (JSON) and runs ``python rl_workers.py spec.json result.json`` with the interpreter of
the system under test (lightning-pref's environment, or a separate one with TRL installed). Each run does
``warmup + steps`` RL steps (one rollout and one optimizer update each) and records, per step, the wall time
(``time.perf_counter``) and the process CPU time (``time.process_time``, one torch thread) from the end of the
previous step to the end of this one, and the same two clocks inside each phase of the step (generation, judging,
scoring the rollout, the update's forward, backward and optimizer step).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

REWARD_FN = "lightning_pref.judges.rules:quiet_letters"


def set_threads() -> None:
    """One torch thread per process: CPU time per step is then the work of the step, whatever else runs on the
    machine (the benchmark host is shared)."""
    import torch

    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):  # already set by an earlier call in this process
        torch.set_num_interop_threads(1)


# ------------------------------------------------------------------------------------------------------- clocks
class PhaseClock:
    """Wall and CPU time of a run's steps and, within each step, of named phases (functions wrapped with
    :meth:`wrap`; a phase may run inside another, e.g. the reference forward inside scoring)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.phases: dict[str, list[float]] = {}  # name -> [wall, cpu] within the current step
        self.facts: dict[str, Any] = {}  # what the current step did (episodes, tokens, prompt signature)
        self.last = (time.perf_counter(), time.process_time())
        self._replaced: list[tuple[Any, str, Any]] = []  # (owner, attribute, original), to restore

    def start(self) -> None:
        """Training starts: the first step is timed from here."""
        self.last = (time.perf_counter(), time.process_time())
        self.phases.clear()
        self.facts.clear()

    @contextlib.contextmanager
    def phase(self, name: str):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            total = self.phases.setdefault(name, [0.0, 0.0])
            total[0] += time.perf_counter() - wall
            total[1] += time.process_time() - cpu

    def replace(self, owner: Any, attribute: str, value: Any) -> None:
        """Set ``owner.attribute`` to ``value`` until :meth:`restore` (runs may share a process)."""
        self._replaced.append((owner, attribute, owner.__dict__.get(attribute, getattr(owner, attribute))))
        setattr(owner, attribute, value)

    def wrap(self, owner: Any, attribute: str, name: str | Callable[..., str]) -> None:
        """Time every call of ``owner.attribute`` as phase ``name`` (or ``name(*args)``: the phase a call is)."""
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            with self.phase(name(*args, **kwargs) if callable(name) else name):
                return original(*args, **kwargs)

        self.replace(owner, attribute, timed)

    def restore(self) -> None:
        """Undo every :meth:`replace` and :meth:`wrap`, the last first."""
        while self._replaced:
            owner, attribute, original = self._replaced.pop()
            setattr(owner, attribute, original)

    def step_end(self) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.steps.append({"wall": wall - self.last[0], "cpu": cpu - self.last[1],
                           "phases": {k: {"wall": v[0], "cpu": v[1]} for k, v in self.phases.items()},
                           **self.facts})
        self.last = (wall, cpu)
        self.phases.clear()
        self.facts = {}


def prompt_signature(prompts: list[list[int]]) -> str:
    """A short hash of a step's prompt token ids (as a sorted multiset): both systems must see the same prompts."""
    return hashlib.sha1(json.dumps(sorted(prompts)).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------------ lightning-pref
def build_lp(spec: dict[str, Any]):
    """The ``PolicyGradientModule`` and prompt data module of a spec (as ``configs/{grpo,rloo}.yaml`` build them,
    with the benchmark's sizes)."""
    import torch

    from lightning_pref.data import PreferenceDataModule
    from lightning_pref.generation import GenerationOptions
    from lightning_pref.rl.module import PolicyGradientModule

    algo = spec["algo"]
    estimator = {"grpo": {"class_path": "grpo", "init_args": {"scale_std": True}},
                 "rloo": {"class_path": "rloo"},
                 "ppo": {"class_path": "gae", "init_args": {"gamma": 1.0, "lam": 0.95}}}[algo]
    judge = spec.get("judge") or {"class_path": "function", "init_args": {"fn": REWARD_FN}}
    lr, optimizer_args = spec["lr"], spec.get("optimizer_args", {})
    module = PolicyGradientModule(
        policy=spec["model_dir"], tokenizer=spec["lp_tokenizer"], judge=judge, estimator=estimator,
        samples_per_prompt=spec["k"], ppo_epochs=spec.get("ppo_epochs", 1), minibatches=1, clip=0.2,
        max_grad_norm=1.0, loss_aggregation="token_mean", kl=spec["kl"], critic=spec.get("critic"),
        eos_penalty=spec.get("eos_penalty"),
        generation=GenerationOptions(max_new_tokens=spec["max_new_tokens"], do_sample=True,
                                     temperature=spec.get("temperature", 1.0), top_p=1.0, top_k=0, seed=0),
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **optimizer_args),
    )
    data = PreferenceDataModule(train=spec["prompts_lp"], val=None, tokenizer=module.tokenizer,
                                batch_size=spec["prompts_per_step"], max_length=spec["max_length"],
                                train_data="prompts", cache=False)
    return module, data


def run_lp(spec: dict[str, Any]) -> dict[str, Any]:
    """``warmup + steps`` RL steps of lightning-pref in a bare Lightning ``Trainer`` (no logger, progress bar or
    checkpointing: TRL runs with ``report_to="none"`` and ``save_strategy="no"``)."""
    set_threads()
    clock = PhaseClock()
    try:
        return _run_lp(spec, clock)
    finally:
        clock.restore()


def _run_lp(spec: dict[str, Any], clock: PhaseClock) -> dict[str, Any]:
    import torch
    from lightning.pytorch import Callback, Trainer, seed_everything

    import lightning_pref.generation as generation
    from lightning_pref.generation import Sampler

    if not spec.get("shared_prefill", True):
        # "Before prefill sharing": every sample runs its prompt's prefill, as transformers' generate does.
        clock.replace(generation, "_shared_prefill", lambda *args, **kwargs: None)
    else:
        clock.wrap(generation, "_shared_prefill", "prefill")
    clock.wrap(Sampler, "__call__", "generation")
    seed_everything(0, verbose=False)
    module, data = build_lp(spec)
    metrics: list[dict[str, float]] = []

    class Timing(Callback):
        def on_train_start(self, trainer, pl_module):
            roll_out = pl_module.roll_out

            def recorded(prompts, values, seed):
                rollout = roll_out(prompts, values, seed)
                clock.facts.update(episodes=int(rollout.completions.lengths.numel()),
                                   completion_tokens=int(rollout.completions.lengths.sum()),
                                   prompt_tokens=sum(len(p) for p in prompts), prompts=prompt_signature(prompts))
                return rollout

            pl_module.roll_out = recorded
            clock.wrap(pl_module, "roll_out", "rollout")
            clock.wrap(pl_module, "experience", "scoring")
            clock.wrap(pl_module.reference, "per_token", "reference")
            if pl_module.critic is not None:
                clock.wrap(pl_module, "critic_values", lambda *a, **k: "critic" if not torch.is_grad_enabled()
                           else "critic_train")
            clock.wrap(pl_module, "update", "update")
            clock.wrap(pl_module.policy, "token_logps", "forward")
            clock.wrap(pl_module, "manual_backward", "backward")
            clock.wrap(trainer.optimizers[0], "step", "optimizer")
            clock.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.step_end()
            metrics.append({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})

    trainer = Trainer(
        # max_steps counts optimizer updates: ppo_epochs per rollout (one minibatch each)
        max_steps=(spec["warmup"] + spec["steps"]) * spec.get("ppo_epochs", 1), accelerator="cpu", devices=1,
        precision="32-true",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Timing()],
        default_root_dir=spec["run_dir"],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=data)
    return {"steps": clock.steps, "metrics": metrics, "stop_ids": module.sampler.stop_ids,
            "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------------------------- TRL
def quiet_letters_reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    """lightning-pref's ``quiet_letters`` rule as a TRL reward function (a conversational completion is a list
    with one assistant message)."""
    from lightning_pref.judges.rules import quiet_letters

    return [quiet_letters(p, c if isinstance(c, str) else c[-1]["content"]) for p, c in zip(prompts, completions,
                                                                                          strict=True)]


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """``warmup + steps`` steps of TRL's ``GRPOTrainer`` (``algo: grpo``) or ``RLOOTrainer`` (``rloo``): HF
    ``generate`` (no vLLM), one optimizer step per generation batch, everything else as close to lightning-pref's
    run as TRL allows (see ``rl_step.py``'s docstring for what differs)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_DISABLED", "true")
    import datasets
    import torch
    from transformers import AutoTokenizer, TrainerCallback

    set_threads()
    grpo = spec["algo"] == "grpo"
    if grpo:
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer
    from lightning_pref.models import load_tokenizer

    # TRL encodes a text prompt with tokenizer(text): lightning-pref's byte tokenizer adds no EOS to it, so both
    # systems sample from the same prompt ids.
    tokenizer = (load_tokenizer("byte") if spec["lp_tokenizer"] == "byte"
                 else AutoTokenizer.from_pretrained(spec["model_dir"]))
    dataset = datasets.load_dataset("json", data_files=spec["prompts_trl"], split="train",
                                    cache_dir=str(Path(spec["run_dir"]) / "hf_datasets"))
    clock = PhaseClock()
    k, b = spec["k"], spec["prompts_per_step"]
    extra = ({"loss_type": "dapo", "scale_rewards": "group"} if grpo else {"normalize_advantages": False})
    args = Config(
        output_dir=spec["run_dir"], per_device_train_batch_size=b * k, gradient_accumulation_steps=1,
        num_generations=k, max_completion_length=spec["max_new_tokens"], temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=spec["lr"], weight_decay=0.0, optim="adamw_torch", lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=1.0, max_steps=spec["warmup"] + spec["steps"], bf16=False, fp16=False,
        gradient_checkpointing=False, report_to="none", save_strategy="no", logging_steps=1, seed=0,
        beta=spec["kl"]["coef"], epsilon=0.2, num_iterations=1, shuffle_dataset=False, disable_dropout=True,
        model_init_kwargs={"dtype": "float32"}, use_cpu=True, dataloader_num_workers=0, **extra,
    )

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            clock.wrap(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer, "step", "optimizer")
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            clock.step_end()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model=spec["model_dir"], reward_funcs=[quiet_letters_reward], args=args,
                          train_dataset=dataset, processing_class=tokenizer, callbacks=[Clock()])
    generate = trainer._generate

    def recorded(prompts):
        out = generate(prompts)  # GRPO returns 8 fields, RLOO 3; both start with prompt and completion ids
        prompt_ids, completion_ids = out[0], out[1]
        # TRL's batch holds each prompt k times (one generate row per completion): the distinct prompts are
        # every k-th, as lightning-pref sees them.
        clock.facts.update(episodes=len(completion_ids), completion_tokens=sum(len(c) for c in completion_ids),
                           prompt_tokens=sum(len(p) for p in prompt_ids[::k]), prompts=prompt_signature(prompt_ids[::k]))
        return out

    trainer._generate = recorded
    clock.wrap(trainer, "_generate", "generation")
    clock.wrap(trainer, "_calculate_rewards", "judge")
    clock.wrap(trainer, "_generate_and_score_completions", "rollout_and_scoring")
    clock.wrap(trainer, "_get_per_token_logps_and_entropies",
               lambda *a, **kw: "forward" if torch.is_grad_enabled() else "scoring_forward")
    clock.wrap(trainer.accelerator, "backward", "backward")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    metrics = [{k: float(v) for k, v in row.items() if isinstance(v, int | float)} for row in trainer.state.log_history]
    return {"steps": clock.steps, "metrics": metrics, "stop_ids": list(trainer.eos_token_ids),
            "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------- SmolLM2 PPO check
def make_reward_model(spec: dict[str, Any]) -> str:
    """A reward model of SmolLM2 made by ``RewardModule`` (a few Bradley–Terry steps on HH pairs, one validation
    for its score statistics) and written by ``save_reward_model``; reused when the directory exists."""
    out = Path(spec["reward_model_dir"])
    if (out / "config.json").is_file():
        return str(out)
    import torch
    from lightning.pytorch import Trainer, seed_everything

    from lightning_pref.data import PreferenceDataModule
    from lightning_pref.reward import RewardModule
    from lightning_pref.reward.export import save_reward_model

    seed_everything(0, verbose=False)
    module = RewardModule(spec["model_dir"], optimizer=lambda p: torch.optim.AdamW(p, lr=1e-5, weight_decay=0.0))
    data = PreferenceDataModule(train=spec["rm_pairs"]["train"], val=spec["rm_pairs"]["val"],
                                tokenizer=module.tokenizer, batch_size=2, max_length=192, cache=False)
    trainer = Trainer(max_steps=3, val_check_interval=3, accelerator="cpu", devices=1, precision="32-true",
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=spec["run_dir"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=data)
    save_reward_model(module, out)
    return str(out)


def run_ppo(spec: dict[str, Any]) -> dict[str, Any]:
    """PPO (estimator ``gae``) on SmolLM2: the critic starts from an exported reward model and the judge is that
    reward model (score centred on its mean over the data's responses, as InstructGPT); the configs/recipes/ppo.yaml
    settings, in fp32 without gradient checkpointing. The metrics of every step must be finite."""
    set_threads()
    path = make_reward_model(spec)
    spec = {**spec, "judge": {"class_path": "reward_model", "init_args": {"path": path, "center": True}},
            "critic": {"model": path, "vf_coef": 0.1, "value_clip": 0.2}}
    out = run_lp(spec)
    values = [v for row in out["metrics"] for v in row.values()]
    out["all_finite"] = bool(values) and all(math.isfinite(v) for v in values)
    return out


RUNNERS = {"lp": run_lp, "trl": run_trl, "ppo": run_ppo}


def main(argv: list[str]) -> None:
    spec = json.loads(Path(argv[0]).read_text())
    result = RUNNERS[spec["runner"]](spec)
    Path(argv[1]).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
