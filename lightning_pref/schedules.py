"""Learning-rate schedules that know the run's length.

DPO recipes warm up and then decay over the whole run (TRL's ``warmup_ratio`` with ``lr_scheduler_type``).
torch's schedulers need the number of steps written into the config, which then disagrees with
``--trainer.max_steps`` given on the command line, and transformers' schedule functions cannot be given as a
``class_path``. :class:`WarmupDecay` takes its length from the trainer instead.
"""

from __future__ import annotations

import math
from typing import Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupDecay(LambdaLR):
    """Linear warmup, then cosine or linear decay to ``min_ratio`` times the optimizer's learning rate.

    In YAML: ``scheduler: {class_path: lightning_pref.schedules.WarmupDecay, init_args: {warmup: 0.1}}``.

    Args:
        optimizer: the optimizer (given by ``PreferenceModule``).
        warmup: warmup length: a fraction of the run (``0.1``) or, from 1 up, a number of optimizer steps.
        decay: ``cosine``, ``linear`` or ``constant`` after the warmup.
        min_ratio: learning rate at the end of the decay, as a fraction of the peak.
        total_steps: optimizer steps of the run; ``None`` = the trainer's (``PreferenceModule`` calls
            :meth:`set_total_steps` with ``trainer.estimated_stepping_batches``).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup: float = 0.1,
        decay: Literal["cosine", "linear", "constant"] = "cosine",
        min_ratio: float = 0.0,
        total_steps: int | None = None,
    ) -> None:
        if warmup < 0 or not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"WarmupDecay: warmup must be >= 0 and min_ratio in [0, 1], got {warmup}, {min_ratio}")
        if warmup >= 1 and warmup != int(warmup):  # 1.5 would be read as 1 step
            raise ValueError(f"WarmupDecay: warmup {warmup} is neither a fraction of the run (< 1) nor a number of "
                             "steps (a whole number)")
        self.warmup, self.decay, self.min_ratio, self.total_steps = warmup, decay, min_ratio, total_steps
        super().__init__(optimizer, self.factor)
        self._check_warmup()

    def _check_warmup(self) -> None:
        if self.total_steps and self.warmup >= 1 and self.warmup >= self.total_steps:  # the peak is never reached
            raise ValueError(f"WarmupDecay: warmup {int(self.warmup)} steps is not shorter than the run's "
                             f"{self.total_steps} optimizer steps, so the learning rate never reaches its peak; "
                             "shorten warmup (or give a fraction of the run, e.g. 0.1)")

    def set_total_steps(self, total_steps: int) -> None:
        """Fill in the run's length when it was left unset (and redo the learning rate of the current step,
        which the constructor set without knowing it)."""
        if self.total_steps is not None:
            return
        self.total_steps = int(total_steps)
        self._check_warmup()
        self._last_lr = [base * self.factor(self.last_epoch) for base in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr, strict=True):
            group["lr"] = lr

    @property
    def warmup_steps(self) -> int:
        if self.warmup >= 1:
            return int(self.warmup)
        return round(self.warmup * (self.total_steps or 0))

    def factor(self, step: int) -> float:
        """Learning rate at optimizer step ``step`` as a fraction of the peak."""
        warmup = self.warmup_steps
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if self.decay == "constant" or not self.total_steps:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, self.total_steps - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.decay == "cosine" else 1 - progress
        return self.min_ratio + (1 - self.min_ratio) * shape
