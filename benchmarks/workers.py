"""One benchmark variant per process: the plain-PyTorch floor, lightning-pref (CLI path or a bare Trainer), TRL.

Each ``run_*`` takes the spec dict written by ``train_step.py`` and returns the :class:`StepClock` report plus a
few facts about the run. Every variant builds its policy with the same helper and seed, so all start from the
same weights, and reads the same generated data.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench_lib import PAD, PRECISIONS, StepClock, StepTimer, compute_dtype, device, load_model, param_counts

BETA = 0.1


def _seed(seed: int = 0) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------- plain floor
def _pad_rows(rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``prompt + response`` rows: input ids, attention mask, response (loss) mask."""
    length = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    response = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, (p, r) in enumerate(rows):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        attention[i, : len(p) + len(r)] = 1
        response[i, len(p) : len(p) + len(r)] = True
    return ids, attention, response


def _sequence_logps(model, ids: torch.Tensor, attention: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """The textbook way: full ``(N, T, V)`` logits, ``log_softmax``, gather, masked sum."""
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
    token_logps = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token_logps * response[:, 1:]).sum(-1)


def run_floor(spec: dict[str, Any]) -> dict[str, Any]:
    """Minimal DPO (or KTO) loop: same model, data, optimizer and precision; no framework at all."""
    _seed()
    pairs = json.loads(Path(spec["ids"]).read_text())
    autocast, param_dtype = PRECISIONS[spec["precision"]]
    where = device()
    policy = load_model(spec["model"], spec["vocab"]).to(where, getattr(torch, param_dtype))
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=spec["lr"], weight_decay=0.0)
    eos = [1]
    B, steps, kto = spec["batch_size"], spec["warmup"] + spec["steps"], spec["loss"] == "kto"
    clock = StepClock(spec["warmup"])
    order = list(range(len(pairs)))
    random.Random(0).shuffle(order)
    clock.memory.on_train_start()
    for step in range(steps):
        chunk = [pairs[i] for i in order[step * B : (step + 1) * B]]
        if kto:  # 2B examples: each pair as a desirable and an undesirable example (same tokens as DPO)
            rows = [(p["prompt"], p["chosen"] + eos) for p in chunk] + [(p["prompt"], p["rejected"] + eos) for p in chunk]
            # KL rows: each prompt with the completion of the next example whose prompt differs.
            kl_rows = [(rows[i][0], rows[i // B * B + (i + 1) % B][1]) for i in range(len(rows))]
        else:
            rows = [(p["prompt"], p["chosen"] + eos) for p in chunk] + [(p["prompt"], p["rejected"] + eos) for p in chunk]
        ids, attention, response = (t.to(where) for t in _pad_rows(rows))
        clock.batch(attention)
        with torch.autocast(where, getattr(torch, autocast)) if autocast else contextlib.nullcontext():
            logps = _sequence_logps(policy, ids, attention, response)
            with torch.no_grad():
                ref_logps = _sequence_logps(reference, ids, attention, response)
            ratio = logps - ref_logps
            if kto:
                kl_ids, kl_attention, kl_response = (t.to(where) for t in _pad_rows(kl_rows))
                with torch.no_grad():
                    kl = (_sequence_logps(policy, kl_ids, kl_attention, kl_response)
                          - _sequence_logps(reference, kl_ids, kl_attention, kl_response)).mean().clamp(min=0)
                desirable, undesirable = ratio[:B], ratio[B:]
                loss = torch.cat([1 - torch.sigmoid(BETA * (desirable - kl)),
                                  1 - torch.sigmoid(BETA * (kl - undesirable))]).mean()
            else:
                loss = -F.logsigmoid(BETA * (ratio[:B] - ratio[B:])).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        clock.step_end()
    return {**clock.report(), "params": param_counts(policy), "final_loss": float(loss)}


# --------------------------------------------------------------------------------------------- lightning-pref
def _lp_config(spec: dict[str, Any], root: Path) -> dict[str, Any]:
    """The YAML config the CLI is given (the same fields a user's config has)."""
    kto = spec["loss"] == "kto"
    lp = spec.get("lp", {})
    model = {
        "policy": spec["model"],
        "tokenizer": spec["tokenizer"],
        "loss": {"class_path": spec["loss"], "init_args": {"beta": BETA}},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": spec["lr"], "weight_decay": 0.0}},
        "reference_mode": lp.get("reference_mode", "model"),
        "response_only_head": lp.get("response_only_head", True),
        "gradient_checkpointing": lp.get("gradient_checkpointing", False),
        "compile": lp.get("compile", False),
    }
    if model["reference_mode"] == "precomputed":  # the only mode with a cache (another refuses the option)
        model["reference_cache_dir"] = str(Path(spec["workdir"]) / "reference_cache")
    if "chunk_size" in lp:  # otherwise the package default
        model["chunk_size"] = lp["chunk_size"]
    data = {
        "train": spec["data"]["unpaired" if kto else "paired"],
        "val": None,
        # KTO: 2B unpaired examples per step = the tokens of B pairs (see README).
        "batch_size": spec["batch_size"] * (2 if kto else 1),
        "max_length": spec["prompt_len"] + spec["response_len"] + 8,
        "group_by_length": lp.get("group_by_length", False),
        "packing": lp.get("packing", False),
        "cache_dir": str(Path(spec["workdir"]) / "token_cache"),
    }
    trainer = {
        "max_steps": spec["warmup"] + spec["steps"],
        "default_root_dir": str(root),
        "accelerator": "auto",
        "devices": 1,
        "precision": lp.get("precision", spec["precision"]),
        "callbacks": [{"class_path": "bench_lib.StepTimer", "init_args": {"warmup": spec["warmup"]}}],
    }
    return {"seed_everything": 0, "trainer": trainer, "model": model, "data": data}


def run_lp(spec: dict[str, Any]) -> dict[str, Any]:
    """lightning-pref exactly as ``lightning-pref fit --config run.yaml`` runs it (rich progress bar, CSV
    logger, last.ckpt checkpointing: the CLI's defaults)."""
    import yaml

    from lightning_pref.cli import main

    root = Path(spec["run_dir"])
    root.mkdir(parents=True, exist_ok=True)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(_lp_config(spec, root)))
    main(["fit", "--config", str(config)])
    report = StepTimer.last.clock.report()
    return {**report, "params": param_counts(load_model(spec["model"], spec["vocab"]))}


def run_lp_bare(spec: dict[str, Any]) -> dict[str, Any]:
    """Diagnostic: the same module and data module in a bare ``lightning.Trainer`` (no progress bar, no logger,
    no checkpointing), to measure what the CLI's default callbacks cost per step."""
    from lightning.pytorch import Trainer, seed_everything

    from lightning_pref.data import PreferenceDataModule
    from lightning_pref.module import PreferenceModule
    from lightning_pref.registry import get_loss_class

    cfg = _lp_config(spec, Path(spec["run_dir"]))
    seed_everything(0)
    m = dict(cfg["model"])
    loss = get_loss_class(m.pop("loss")["class_path"])(beta=BETA)
    opt = m.pop("optimizer")["init_args"]
    module = PreferenceModule(
        loss=loss, optimizer=lambda params: torch.optim.AdamW(params, **opt), **m
    )
    data = PreferenceDataModule(tokenizer=module.tokenizer, **cfg["data"])
    timer = StepTimer(spec["warmup"])
    trainer = Trainer(
        max_steps=cfg["trainer"]["max_steps"], accelerator="auto", devices=1, precision=cfg["trainer"]["precision"],
        logger=False,
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False, callbacks=[timer],
        default_root_dir=spec["run_dir"],
    )
    trainer.fit(module, datamodule=data)
    return {**timer.clock.report(), "params": param_counts(module.policy.model)}


# ---------------------------------------------------------------------------------------------------------- TRL
def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL's DPOTrainer / KTOTrainer with its defaults, except: the benchmark's precision (TRL defaults to bf16
    mixed precision; fp32 unless ``--precision`` says otherwise), the same lr and AdamW without weight decay (TRL's
    default weight decay is already 0), no reporting integrations."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_DISABLED", "true")
    import datasets
    from transformers import PreTrainedTokenizerFast, TrainerCallback

    kto = spec["loss"] == "kto"
    if kto:
        from trl import KTOConfig as Config
        from trl import KTOTrainer as Trainer
    else:
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer

    _seed()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(spec["tokenizer"])
    dataset = datasets.load_dataset(
        "json", data_files=spec["data"]["unpaired" if kto else "paired"], split="train",
        cache_dir=str(Path(spec["workdir"]) / "hf_datasets"),
    )
    param_dtype = PRECISIONS[spec["precision"]][1]
    model = load_model(spec["model"], spec["vocab"]).to(getattr(torch, param_dtype))
    # TRL would otherwise rebuild the reference with from_pretrained(config.name_or_path); a config-built model
    # has no path, so the reference is passed in: the same weights (same helper and seed), frozen by TRL.
    reference = load_model(spec["model"], spec["vocab"]).to(getattr(torch, param_dtype))
    clock = StepClock(spec["warmup"])

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.memory.on_train_start()

        def on_step_end(self, args, state, control, **kwargs):
            clock.step_end()

    args = Config(
        output_dir=str(spec["run_dir"]),
        per_device_train_batch_size=spec["batch_size"] * (2 if kto else 1),
        learning_rate=spec["lr"],
        weight_decay=0.0,
        max_steps=spec["warmup"] + spec["steps"],
        bf16=compute_dtype(spec["precision"]) == "bfloat16",  # autocast; with bf16 weights (bf16-true) the step is pure bf16
        fp16=False,
        report_to="none",
        seed=0,
        beta=BETA,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model=model, ref_model=reference, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Clock()])
    collate = trainer.data_collator

    def counting_collator(examples):
        batch = collate(examples)
        clock.batch(batch["attention_mask"])
        return batch

    trainer.data_collator = counting_collator
    trainer.train()
    return {**clock.report(), "params": param_counts(model)}


RUNNERS = {"floor": run_floor, "lp": run_lp, "lp_bare": run_lp_bare, "trl": run_trl}
