"""What the policy writes: ``predict``'s JSONL of completions, and completions sampled while training.

- :class:`PredictionWriter` (always on in the CLI, ``--predictions.*``): Lightning's ``BasePredictionWriter``
  collecting each rank's records and writing them once, in input order, as ``predictions.jsonl`` in the run's
  log directory (each prompt once, also when a distributed sampler padded duplicates in).
- :class:`SampleCompletions` (opt-in): at each validation, the policy's and the reference's completions for a
  fixed handful of validation prompts, appended to ``completions.jsonl`` in the run directory and logged as a
  table where the logger has one (W&B ``log_table``, TensorBoard text).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from rich.console import Console

from lightning_pref.checks import check_output_path
from lightning_pref.errors import UserInputError
from lightning_pref.generation import Completions

PREDICTIONS = "predictions.jsonl"
COMPLETIONS = "completions.jsonl"


def all_gather_objects(trainer: Trainer, items: list[Any]) -> list[Any]:
    """Every rank's ``items``, concatenated (rank order); the items themselves where there is one process."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return list(items)
    gathered: list[list[Any]] = [[] for _ in range(trainer.world_size)]
    torch.distributed.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def write_jsonl(path: Path, records: list[dict[str, Any]], append: bool = False) -> None:
    """Write records, one JSON object per line; a new file is written whole under a temporary name first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if append:
        with path.open("a", encoding="utf-8") as f:
            f.write(text)
        return
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def prediction_records(prompts: list[Any], policy: Completions, reference: Completions | None) -> list[dict[str, Any]]:
    """One record per prompt (see :class:`PredictionWriter`): the prompt as the data gave it, and each side's
    completion(s), tokens and whether each ended with a stop token."""
    records = []
    for i, prompt in enumerate(prompts):
        record = {"prompt": prompt, **_completion_fields("policy", policy, i)}
        record |= _completion_fields("reference", reference, i) if reference is not None else {"reference": None}
        records.append(record)
    return records


def _completion_fields(name: str, completions: Completions, i: int) -> dict[str, Any]:
    """Prompt ``i``'s completions as record fields: text(s), tokens, whether each ended with a stop token."""
    k = len(completions.texts[i])
    rows = slice(i * k, (i + 1) * k)
    texts, tokens, eos = completions.texts[i], completions.lengths[rows].tolist(), completions.eos[rows].tolist()
    if k == 1:
        return {name: texts[0], f"{name}_tokens": tokens[0], f"{name}_eos": eos[0]}
    return {name: texts, f"{name}_tokens": tokens, f"{name}_eos": eos}


class PredictionWriter(BasePredictionWriter):
    """Writes ``predict``'s completions as JSONL, one record per prompt, in input order.

    A record is ``{"prompt": ..., "policy": ..., "reference": ...}`` (the prompt as the data gave it; a
    completion string each, or a list with ``num_return_sequences > 1``; ``reference`` is null without a
    reference model), plus ``policy_tokens``/``policy_eos`` (and the reference's): tokens generated and whether
    the completion ended with a stop token rather than at ``max_new_tokens``.

    Args:
        path: the file; ``None`` = ``predictions.jsonl`` in the command's log directory: for a checkpoint of a
            training run a new ``predict`` (``predict-1``, ...) directory inside that run, else a new
            ``lightning_logs/version_N``.
        overwrite: allow replacing an existing file at ``path``.
    """

    def __init__(self, path: str | None = None, overwrite: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.path, self.overwrite = path, overwrite
        self.records: list[dict[str, Any]] = []  # after predict, on rank 0: every record, in input order
        self.written: Path | None = None
        self._mine: list[tuple[int, dict[str, Any]]] = []

    def target(self, trainer: Trainer) -> Path:
        """Where the file goes (asks for ``trainer.log_dir``: a collective, so every rank must call this)."""
        return Path(self.path) if self.path else Path(trainer.log_dir or trainer.default_root_dir) / PREDICTIONS

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        target = self.target(trainer)
        if trainer.is_global_zero:
            check_output_path("--predictions.path", target, "file")
        if trainer.is_global_zero and target.exists() and not self.overwrite:
            raise UserInputError(f"--predictions.path: {target} exists; choose another or pass --predictions.overwrite true")
        self._mine, self.records, self.written = [], [], None

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        for i, record in enumerate(prediction["records"]):
            if prediction["weights"][i] > 0:  # a duplicate a distributed sampler padded in is its owner's
                self._mine.append((int(prediction["index"][i]), record))

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        merged = sorted(all_gather_objects(trainer, self._mine), key=lambda item: item[0])
        self.records = [record for _, record in merged]
        target = self.target(trainer)
        if trainer.is_global_zero:
            self.written = target
            write_jsonl(self.written, self.records)
            Console(highlight=False, soft_wrap=True).print(
                f"predict: wrote {len(self.records)} record{'s' * (len(self.records) != 1)} to {target}", markup=False)


class SampleCompletions(Callback):
    """At each validation, generate for the first ``num_prompts`` validation prompts with the policy and the
    reference, and record them: ``completions.jsonl`` in the run directory (``{"step", "epoch", "prompt",
    "policy", "reference"}`` per prompt) and a table in the logger where it has one.

    In YAML: ``trainer: {callbacks: [{class_path: lightning_pref.predict.SampleCompletions}]}``. Sampling follows
    ``model.generation`` (greedy by default), so successive tables show what training changed, not noise.

    Args:
        num_prompts: how many validation prompts (the first ones, so every validation shows the same).
    """

    def __init__(self, num_prompts: int = 4) -> None:
        self.num_prompts = num_prompts

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        val = getattr(trainer.datamodule, "datasets", {}).get("val")
        if val is None or not hasattr(pl_module, "complete"):
            return
        prompts = [val[i].prompt for i in range(min(self.num_prompts, len(val)))]
        # every rank generates (sharded strategies gather weights per forward) and asks for the log directory
        # (a collective); rank 0 writes
        policy, reference = pl_module.complete(prompts)
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        decode = pl_module.tokenizer.decode
        records = [
            {"step": trainer.global_step - 1, "epoch": trainer.current_epoch, "prompt": decode(p),  # as metrics.csv
             "policy": policy.texts[i][0], "reference": reference.texts[i][0] if reference is not None else None}
            for i, p in enumerate(prompts)
        ]
        write_jsonl(log_dir / COMPLETIONS, records, append=True)
        self._log_table(trainer, records)

    @staticmethod
    def _log_table(trainer: Trainer, records: list[dict[str, Any]]) -> None:
        columns = ["prompt", "policy", "reference"]
        rows = [[r[c] or "" for c in columns] for r in records]
        for logger in trainer.loggers:
            if hasattr(logger, "log_table"):  # Weights & Biases
                logger.log_table(key="completions", columns=columns, data=rows, step=trainer.global_step)
            elif hasattr(getattr(logger, "experiment", None), "add_text"):  # TensorBoard
                table = "| prompt | policy | reference |\n|---|---|---|\n" + "\n".join(
                    "| " + " | ".join(_cell(v) for v in row) + " |" for row in rows
                )
                logger.experiment.add_text("completions", table, global_step=trainer.global_step)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")
