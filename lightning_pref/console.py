"""What a training subcommand prints: the progress bar (a live bar on a terminal, metrics lines in a log file),
the model summary, the summary at the end of ``fit``, and the third-party noise left out. Always-on callbacks of
:mod:`lightning_pref.trainer_cli`."""

from __future__ import annotations

import logging
import shlex
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from rich.console import Console
from rich.table import Table


class ProgressBar(RichProgressBar):
    """Rich's progress bar as a console user expects it, on a terminal and in a log file.

    On a terminal: no ``Epoch 0/-2`` when the run is bounded by ``max_steps``, no ``v_num`` (the log directory's
    version) among the metrics, metrics with 4 significant digits (a DPO loss of 0.00012 is not ``0.000``), and the
    live bar stopped when ``fit`` ends, so the run's summary prints below its last frame instead of under it.
    When standard output is not a terminal (a log file, ``nohup``, SLURM, CI) Rich would print nothing until the
    end: instead a line of the step's metrics every ``trainer.log_every_n_steps`` steps and after each validation,
    as TRL and plain training scripts do.

    Args:
        refresh_rate: as Lightning's (0 turns the bar, and the lines, off).
        leave: as Lightning's.
        **kwargs: more ``RichProgressBar`` arguments.
    """

    def __init__(self, refresh_rate: int = 1, leave: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("theme", RichProgressBarTheme(metrics_format=".4g"))
        super().__init__(refresh_rate=refresh_rate, leave=leave, **kwargs)
        self._lines: bool | None = None  # decided at the first stage: a log file gets lines, a terminal the bar

    @property
    def lines(self) -> bool:
        if self._lines is None:
            self._lines = not Console().is_terminal
        return self._lines

    @property
    def is_enabled(self) -> bool:
        return super().is_enabled and not self.lines  # in a log file the lines replace the live bar

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:
            return f"Epoch {current_epoch}"
        return super()._get_train_description(current_epoch)

    @property
    def total_train_batches(self) -> int | float:
        """This epoch's batches, as far as the run goes: Lightning's bound by ``max_steps`` counts the steps left
        as batches from 0, but a run resumed mid-epoch counts its batches from where the interrupted one stopped
        (``120/70`` after a resume at step 50 of 120), and each step is ``accumulate_grad_batches`` batches."""
        trainer = self.trainer
        total = trainer.num_training_batches
        if not trainer.max_steps or trainer.max_steps < 0:
            return total
        loop = trainer.fit_loop.epoch_loop
        # resumed mid-epoch, the batches the interrupted run trained on count (the epoch loop resets its count
        # only after on_train_epoch_start, so outside a restart the count is the previous epoch's)
        done = loop.batch_progress.current.processed if loop.restarting else 0
        return min(total, done + (trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches)

    def get_metrics(self, trainer: Trainer, pl_module: Any) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    def on_fit_end(self, trainer: Trainer, pl_module: Any) -> None:
        self._stop_progress()

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        every = max(1, trainer.log_every_n_steps)
        if self.lines and super().is_enabled and trainer.is_global_zero and (batch_idx + 1) % every == 0:
            total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.num_training_batches
            # labelled as metrics.csv labels it: the step's index (counting from 0), then steps done
            self._print_line(f"step {trainer.global_step - 1} [{trainer.global_step}/{total}]",
                             trainer.progress_bar_metrics)

    def on_validation_end(self, trainer: Trainer, pl_module: Any) -> None:
        super().on_validation_end(trainer, pl_module)
        if self.lines and super().is_enabled and trainer.is_global_zero and not trainer.sanity_checking:
            metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            fitting = trainer.state.fn == "fit"  # validate/test of a checkpoint: no step of this process to name
            self._print_line(f"validation at step {trainer.global_step - 1}" if fitting else "validation", metrics)

    @staticmethod
    def _print_line(head: str, metrics: dict[str, Any]) -> None:
        values = "  ".join(f"{k} {float(v):.4g}" for k, v in sorted(metrics.items()) if k != "v_num")
        Console(highlight=False, soft_wrap=True).print(f"{head}  {values}", markup=False)


class ModelSummary(RichModelSummary):
    """Lightning's model summary without its FLOPs column and total, which stay 0 for these modules (no example
    input to trace): the throughput monitor logs the real model FLOPs per step (``train/device/flops_per_sec``)."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        from rich import get_console

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            table.add_column(name, justify="right" if name in ("Params", "Params per Device") else "left",
                             style="dim" if not name.strip() else None)
        for row in zip(*(values for _, values in columns), strict=True):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        trainable, total = get_human_readable_count(trainable_parameters), get_human_readable_count(total_parameters)
        console.print(f"Trainable params: {trainable}, non-trainable: "
                      f"{get_human_readable_count(total_parameters - trainable_parameters)}, total: {total} "
                      f"({model_size:.3g} MB); modules in train / eval mode: {total_training_modes['train']} / "
                      f"{total_training_modes['eval']}", highlight=False)


class RunSummary(Callback):
    """At the end of ``fit`` (rank 0): the final validation metrics, where the checkpoints are, and the commands
    that come next (export, report). Always on in the CLI; the same lines every run, so scripts can read them."""

    def __init__(self) -> None:
        self.validated_at: int | None = None  # optimizer steps done at the last validation of this fit

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.validated_at = trainer.global_step

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        log_dir = trainer.log_dir  # a collective under several processes: every rank asks
        if not trainer.is_global_zero:
            return
        console = Console(highlight=False, soft_wrap=True)
        metrics = {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val/")}
        if metrics and self.validated_at is not None:
            # the step as metrics.csv labels it (its index, from 0), and the steps done; a run whose max_steps
            # falls between validations trained on after its last one, and the title says so
            steps = self.validated_at
            title = (f"final validation (step {steps - 1}, after {steps} optimizer steps)"
                     if steps == trainer.global_step else
                     f"last validation (step {steps - 1}, after {steps} of the run's {trainer.global_step} optimizer "
                     "steps; `lightning-pref validate` of last.ckpt measures the end)")
            table = Table(title=title, title_justify="left")
            table.add_column("metric")
            table.add_column("value", justify="right")
            for key, value in metrics.items():
                table.add_row(key, f"{value:.4g}")
            console.print(table)
        checkpoint = trainer.checkpoint_callback
        last = getattr(checkpoint, "last_model_path", "") or getattr(checkpoint, "best_model_path", "")
        if last:  # the commands quoted for a shell, to be pasted as they are (paths with spaces)
            console.print(f"checkpoints: {Path(last).parent}", markup=False)
            console.print(f"export:      lightning-pref export --ckpt_path {shlex.quote(str(last))} --output_dir "
                          f"{shlex.quote(str(Path(last).parent.parent / 'exported'))}", markup=False)
        if log_dir and (Path(log_dir) / "metrics.csv").exists():
            console.print(f"report:      lightning-pref report {shlex.quote(str(log_dir))}", markup=False)


class _NoTips(logging.Filter):
    """Drops Lightning's advertising tips ("💡 Tip: ... install litlogger") and its note that it skips its own
    model summary because ours (always on, :class:`ModelSummary`) is configured: nothing else."""

    NOISE = ("💡 Tip", "Trainer already configured with model summary callbacks")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


def quiet_console() -> None:
    """Silence, narrowly, the third-party noise a lightning-pref run causes and a user can do nothing about:
    Lightning's install tips; its pytree deprecation (raised inside Lightning on our batch type); its note
    that an always-on checkpoint callback restored from an earlier run's directory will not reload that run's
    top-k state (every run writes a new version directory on purpose); and its warning about the empty
    validation loader of a run without validation data. Every other warning stays."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoTips())
    for message in (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        r"The dirpath has changed from .* therefore `best_model_score`",
        r"Total length of `list` across ranks is zero",
    ):
        warnings.filterwarnings("ignore", message=message)
