"""What tests share: the tiny model's config, small files, batch helpers, and callbacks for tests that run the
CLI in a subprocess. Tests import these from here, never from ``conftest.py`` (which holds only fixtures)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from lightning.pytorch import Callback

from lightning_pref import kl, layout
from lightning_pref.types import PreferenceBatch

TINY = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


class StepLosses(Callback):
    """The training loss of every batch, in order."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def tiny_fit(module, data, steps: int = 2, *, batch_size: int = 4, callbacks=(), data_options=None,
             **trainer_options) -> list[float]:
    """Fit ``module`` on the preference file ``data`` for ``steps`` optimizer steps, writing nothing (no logger,
    checkpoint, progress bar or model summary unless ``trainer_options`` ask); returns each batch's training loss.

    Args:
        module: the module to train.
        data: a preference file (``data.train``).
        steps: ``trainer.max_steps``.
        batch_size: ``data.batch_size``.
        callbacks: more callbacks.
        data_options: more ``PreferenceDataModule`` arguments.
        **trainer_options: more ``Trainer`` arguments (they win over the quiet defaults).
    """
    from lightning.pytorch import Trainer

    from lightning_pref.data import PreferenceDataModule

    dm = PreferenceDataModule(train=str(data), tokenizer=module.tokenizer, batch_size=batch_size,
                              **(data_options or {}))
    recorder = StepLosses()
    quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}
    Trainer(max_steps=steps, callbacks=[recorder, *callbacks], **{**quiet, **trainer_options}).fit(module, dm)
    return recorder.losses


def with_kl_rows(batch: PreferenceBatch, pad_token_id: int = 0) -> PreferenceBatch:
    """``batch`` with KTO's mismatched rows, as a module whose loss needs a KL baseline builds them."""
    batch.kl_rows = kl.mismatched_rows(layout.sequences(batch), pad_token_id, packed=batch.packed is not None)
    return batch


class KillAtStep(Callback):
    """SIGKILL this process (no cleanup, like an OOM kill or a preempted node) once ``step`` steps are done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordLosses(Callback):
    """Write this rank's per-step training losses to ``<directory>/losses_rank<R>.json``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module) -> None:
        import json
        from pathlib import Path

        path = Path(self.directory) / f"losses_rank{trainer.global_rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.losses))


class PrintAtExit(Callback):
    """At the end of ``fit``: an exit handler that prints ``exit handler rank R`` to stdout, unflushed."""

    def on_fit_end(self, trainer, pl_module) -> None:
        import atexit

        atexit.register(lambda: print(f"exit handler rank {trainer.global_rank}", end=""))


class RecordPrompts(Callback):
    """Write the prompt indices of this rank's on-policy training batches to ``<directory>/prompts_rank<R>.json``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.indices: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.indices.append(batch.index.tolist())

    def on_train_end(self, trainer, pl_module) -> None:
        import json
        from pathlib import Path

        path = Path(self.directory) / f"prompts_rank{trainer.global_rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.indices))


class BarTotals(Callback):
    """Append the live progress bar's (batch count, total) of each training batch to ``<path>`` as JSON lines,
    the bar forced on as on a terminal."""

    def __init__(self, path: str) -> None:
        self.path = path

    def setup(self, trainer, pl_module, stage) -> None:
        trainer.progress_bar_callback._lines = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import json

        bar = trainer.progress_bar_callback
        total = bar.progress.tasks[bar.train_progress_bar_id].total
        with open(self.path, "a") as f:  # what the bar shows after this batch: batch_idx + 1 of total
            f.write(json.dumps([trainer.global_step, batch_idx + 1, total]) + "\n")


class Tagged(Callback):
    """A callback with an argument that happens to be called ``loss`` (the CLI must not treat it as a loss)."""

    def __init__(self, loss: str = "") -> None:
        self.loss = loss


def _nan_at_call_base():
    from lightning_pref.losses import DPOLoss

    return DPOLoss


class NaNAtCall(_nan_at_call_base()):
    """DPO whose ``at``-th training call (0-based) returns NaN losses, on process ``rank`` only (``None``: all)."""

    def __init__(self, at: int = 1, rank: int | None = None, beta: float = 0.1) -> None:
        super().__init__(beta)
        self.at, self.rank, self.calls = at, rank, 0

    def forward(self, policy, reference, *, kl_baseline=None):
        import torch

        out = super().forward(policy, reference, kl_baseline=kl_baseline)
        if self.training:
            this_rank = self.rank is None or int(os.environ.get("LOCAL_RANK", 0)) == self.rank
            if self.calls == self.at and this_rank:
                out.losses = out.losses * torch.nan
            self.calls += 1
        return out


def _policy_gradient_base():
    from lightning_pref.rl.module import PolicyGradientModule

    return PolicyGradientModule


class GreedyRollouts(_policy_gradient_base()):
    """A test double: rollouts by greedy decoding, which are the same whatever batch a prompt is sampled in, so a
    2-process run can be compared update for update with a single process. (Greedy decoding is not a sample of
    the policy: never train with it for real; the module refuses ``do_sample: false``.)"""

    def roll_out(self, prompts, values, seed):
        from dataclasses import replace

        from lightning_pref.generation import Sampler
        from lightning_pref.rollout import roll_out

        greedy = Sampler(self.tokenizer, replace(self.generation, do_sample=False), self.sampler.stop_ids)
        return roll_out(greedy, self.policy.lm, self.judge, prompts, values, self.hparams.samples_per_prompt, seed,
                        self.hparams.eos_penalty, logps=True)


def constant_score(prompt: object, completion: str) -> float:
    """A judge function that ties every completion (``judge: {class_path: function, init_args: {fn: ...}}``)."""
    return 0.0
