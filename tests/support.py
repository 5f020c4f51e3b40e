"""Callbacks used by tests that run the CLI in a subprocess."""

from __future__ import annotations

import os
import signal

from lightning.pytorch import Callback


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
