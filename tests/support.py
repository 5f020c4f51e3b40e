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
