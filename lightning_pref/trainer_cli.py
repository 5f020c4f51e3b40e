"""The training subcommands of ``lightning-pref`` (``fit``, ``validate``, ``test``, ``predict``, ``evaluate``):
LightningCLI over the lightning-pref modules and :class:`PreferenceDataModule`.

The module is a subclass argument whose default class is :class:`PreferenceModule`: jsonargparse reads a default
class's arguments given flat (``model: {policy: ..., loss: ...}``, ``--model.policy x``) and any other module by
``model: {class_path: lightning_pref.RewardModule, init_args: ...}``. A plugin argument (``model.loss``,
``model.judge``, ``evaluate``'s ``judge``) takes a registered name wherever jsonargparse takes a class name: see
:func:`resolve_class_path`. Imported by :mod:`lightning_pref.cli` only for these subcommands (it loads
Lightning, transformers and datasets).
"""

from __future__ import annotations

import logging
import pydoc
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import jsonargparse._typehints
import torch
import yaml
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, RichModelSummary, RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from rich.console import Console
from rich.table import Table

from lightning_pref.base_module import BaseModule
from lightning_pref.data import PreferenceDataModule
from lightning_pref.errors import UserInputError
from lightning_pref.evaluate import PreferenceTrainer
from lightning_pref.predict import PredictionWriter
from lightning_pref.registry import REGISTRIES, UnknownPluginError, load_plugins
from lightning_pref.report import RUN_RECORD
from lightning_pref.throughput import TokenThroughput

#: The module a config gets when it names none; jsonargparse normalizes class paths to this shortest form.
DEFAULT_MODULE = "lightning_pref.PreferenceModule"

_resolve_class_name = jsonargparse._typehints.resolve_class_path_by_name


def resolve_class_path(cls: type | tuple[type, ...], name: str) -> str:
    """jsonargparse's resolution of a ``class_path`` given as a bare name, which also knows registered names:
    ``ipo`` where a parameter takes a ``PreferenceLoss``, ``bradley_terry`` where it takes a ``RewardLoss``.

    jsonargparse calls this for every bare class name of a parameter typed ``cls``, wherever the value comes
    from (``--model.loss ipo``, ``--model.loss.class_path ipo``, ``loss: ipo`` or ``class_path: ipo`` in YAML,
    ``--judge no_shouting``). It offers no hook for names that are not class names, so this function replaces
    its resolver (below). The registry is chosen by the parameter's type, so a new module or plugin family needs
    no change here.

    Raises:
        UnknownPluginError: a bare name that is neither registered nor a known class name, with the registered
            names and the closest one.
    """
    registry = next((r for r in REGISTRIES if "." not in name and r.names_subclasses_of(cls)), None)
    if registry is None:
        return _resolve_class_name(cls, name)
    found = registry.resolve(name)
    if found is not None:
        return f"{found.__module__}.{found.__qualname__}"
    path = _resolve_class_name(cls, name)  # an imported subclass that is not registered
    if "." not in path:
        raise UnknownPluginError(registry.unknown_message(name))
    return path


jsonargparse._typehints.resolve_class_path_by_name = resolve_class_path


class PrefParser(LightningArgumentParser):
    """LightningCLI's parser with one-line user errors and the default module written flat."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """jsonargparse's usage and error text, except for a user error met while parsing (an unknown registered
        name): one line naming the option, e.g. ``model.loss: Unknown loss 'dpp'. Did you mean 'dpo'? ...``."""
        cause = _user_error(ex)
        if cause is None or not self.exit_on_error:  # inner parsers' errors are their callers' to report
            super().error(message, ex)
        keys: list[str] = []
        for err in _chain(ex):  # jsonargparse names each level's key: model, then loss within it
            match = re.match(r'Parser key "([^"]+)"', str(err))
            parts = [p for p in match.group(1).split(".") if p != "init_args"] if match else []
            if parts and keys[-len(parts):] != parts:
                keys += parts
        raise UserInputError(f"{'.'.join(keys)}: {cause}" if keys else str(cause)) from None

    def dump(self, cfg: Namespace, format: str = "parser_mode", **kwargs: Any) -> str:
        """The config as jsonargparse writes it, but the default module flat (``model: {policy: ..., loss:
        ...}``), as users write it: ``--print_config``, the run's ``config.yaml`` and the checkpoint's
        hyperparameters (LightningCLI records them from this dump) keep the form they had before the module
        became a subclass argument."""
        text = super().dump(cfg, format=format, **kwargs)
        if format not in ("parser_mode", "yaml") or f"class_path: {DEFAULT_MODULE}\n" not in text:
            return text  # (parser_mode is omegaconf, written as YAML)
        data = yaml.safe_load(text)
        for node in (data, data.get(cfg.get("subcommand"))):  # a subcommand's parser, or the top-level one
            model = node.get("model") if isinstance(node, dict) else None
            if isinstance(model, dict) and model.get("class_path") == DEFAULT_MODULE:
                node["model"] = model.get("init_args") or {}
        header = "".join(f"# {line}\n" for line in self.dump_header or [])
        return header + yaml.safe_dump(data, default_flow_style=False, allow_unicode=True, sort_keys=False)


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    """``err`` and the exceptions it was raised from, outermost first."""
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def _user_error(err: BaseException | None) -> UserInputError | UnknownPluginError | None:
    """The user error that jsonargparse's own errors wrap, if any."""
    return next((e for e in _chain(err) if isinstance(e, (UserInputError, UnknownPluginError))), None)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class LightningPrefCLI(LightningCLI):
    """LightningCLI with the ``evaluate`` subcommand, the module's data needs linked to the data module,
    always-on callbacks that yield to Lightning's own flags, and checkpoint checks."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "evaluate": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"model": {"class_path": DEFAULT_MODULE}})
        parser.link_arguments("model.tokenizer", "data.tokenizer", apply_on="instantiate")
        parser.link_arguments("model.train_data", "data.train_data", apply_on="instantiate")
        # Always-on callbacks, configurable as --checkpoint.*, --progress_bar.*, --predictions.*, --summary.*,
        # --throughput.*: a last.ckpt to resume or validate from, a progress bar showing loss and reward accuracy,
        # predict's JSONL, the summary at the end of fit, and real tokens/s (and MFU) in the logs.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        parser.add_lightning_class_args(ProgressBar, "progress_bar")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(RunSummary, "summary")
        parser.add_lightning_class_args(TokenThroughput, "throughput")
        parser.add_lightning_class_args(ModelSummary, "model_summary")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then settle ``--ckpt_path`` before LightningCLI reads the checkpoint's hyperparameters into the
        config: ``last`` becomes the newest ``last.ckpt`` of earlier runs, and a checkpoint that is missing,
        truncated, not ours, or trained with another policy or loss than the command line gives is one line."""
        self.argv = sys.argv[1:] if args is None else list(args)
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        config = self.config[subcommand]
        if config.get("ckpt_path") == "last":
            last = _last_checkpoint(config, subcommand)
            config["ckpt_path"] = str(last) if last is not None else None
        path = config.get("ckpt_path")
        if path is not None and path not in ("best", "hpc", "registry") and not Path(path).is_dir():
            checkpoint = _read_checkpoint(path)
            _check_kind(checkpoint, config.model, path, subcommand)
            _check_matches(checkpoint, config.model, path, self.argv)
            if subcommand != "fit":
                _log_beside_run(config.trainer, path, subcommand)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI rebuilds the trained model: it reads the checkpoint's hyperparameters into the model
        config. Options the command line gives explicitly (``--model.generation.max_new_tokens 32``) still win;
        a contradicting policy or loss has already been refused (:meth:`parse_arguments`)."""
        subcommand = self.config.get("subcommand")
        before = self.config.clone() if subcommand else None
        super()._parse_ckpt_path()
        if before is None:
            return
        for arg in self.argv:
            key = arg.removeprefix("--").partition("=")[0]
            if not key.startswith("model."):
                continue
            for name in (key, key.replace("model.", "model.init_args.", 1)):  # as given, or flat for init_args
                if f"{subcommand}.{name}" in before:
                    self.config[f"{subcommand}.{name}"] = before[f"{subcommand}.{name}"]
                    break

    def before_instantiate_classes(self) -> None:
        # jsonargparse builds every class of the config through its instantiators; this one (for all classes
        # but the module and data module, which LightningCLI's own build) names the option of an argument that
        # a constructor refuses.
        self.parser.add_instantiator(self._instantiate, object)

    def _instantiate(self, cls: type, *args: Any, **kwargs: Any) -> Any:
        """``cls(*args, **kwargs)``; a refused argument is one line naming the option whose ``class_path`` is
        ``cls``: ``model.loss: dpo: beta must be > 0, got -1``. A plugin that builds others (a weighted loss's
        terms) is the one named."""
        try:
            return cls(*args, **kwargs)
        except UserInputError:
            raise
        except (ValueError, UnknownPluginError) as err:
            config = self.config[self.subcommand] if self.subcommand else self.config
            option = _option_of(cls, config.as_dict())
            raise UserInputError(f"{option}: {_first_line(err)}" if option else _first_line(err)) from err

    def instantiate_classes(self) -> None:
        """As LightningCLI, but a user error raised while building the classes is its one line, not jsonargparse's
        wrapping of it."""
        try:
            super().instantiate_classes()
        except ValueError as err:
            cause = _user_error(err) or UserInputError(_first_line(list(_chain(err))[-1]))
            raise UserInputError(str(cause)) from None

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer with the always-on callbacks, except those a Trainer flag turns off
        (``--trainer.enable_progress_bar false``, ``--trainer.enable_checkpointing false``), and a CSV logger
        under ``default_root_dir`` unless the config names a logger: Lightning's own default would switch to
        TensorBoard whenever it happens to be installed, changing where metrics land."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_config = {**config.get("trainer", {}), **kwargs}
        if trainer_config.get("logger") in (None, True):
            trainer_config["logger"] = CSVLogger(trainer_config.get("default_root_dir") or ".")
        callbacks = [config[key] for key, flag in ALWAYS_ON.items() if flag is None or trainer_config.get(flag) is not False]
        callbacks.append(RunRecord(self.subcommand or "fit", config.get("ckpt_path")))
        return self._instantiate_trainer(trainer_config, callbacks)  # LightningCLI's: adds the config callback


def _option_of(cls: type, config: Any, prefix: str = "") -> str | None:
    """The config key whose ``class_path`` is ``cls``, as users write it (``model.loss``, not
    ``model.init_args.loss``)."""
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ()
    for key, value in items:
        if key == "class_path" and isinstance(value, str) and pydoc.locate(value) is cls:
            return prefix.removesuffix(".").replace(".init_args", "")
        found = _option_of(cls, value, f"{prefix}{key}.")
        if found:
            return found
    return None


#: Always-on callbacks (configured as ``--<key>.*``), and the Trainer flag that turns each off.
ALWAYS_ON = {"checkpoint": "enable_checkpointing", "progress_bar": "enable_progress_bar", "predictions": None,
             "summary": None, "throughput": None, "model_summary": "enable_model_summary"}


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
            self._print_line(f"validation at step {trainer.global_step - 1}", metrics)

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

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        log_dir = trainer.log_dir  # a collective under several processes: every rank asks
        if not trainer.is_global_zero:
            return
        console = Console(highlight=False, soft_wrap=True)
        metrics = {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val/")}
        if metrics:
            # the step as metrics.csv labels it (its index, from 0), and the steps done
            table = Table(title=f"final validation (step {trainer.global_step - 1}, after {trainer.global_step} "
                                "optimizer steps)", title_justify="left")
            table.add_column("metric")
            table.add_column("value", justify="right")
            for key, value in metrics.items():
                table.add_row(key, f"{value:.4g}")
            console.print(table)
        checkpoint = trainer.checkpoint_callback
        last = getattr(checkpoint, "last_model_path", "") or getattr(checkpoint, "best_model_path", "")
        if last:
            console.print(f"checkpoints: {Path(last).parent}", markup=False)
            console.print(f"export:      lightning-pref export --ckpt_path {last} --output_dir "
                          f"{Path(last).parent.parent / 'exported'}", markup=False)
        if log_dir and (Path(log_dir) / "metrics.csv").exists():
            console.print(f"report:      lightning-pref report {log_dir}", markup=False)


def run_of(checkpoint: str | Path) -> Path | None:
    """The run directory a checkpoint was saved in (``.../version_N`` for ``.../version_N/checkpoints/x.ckpt``,
    where Lightning's ``ModelCheckpoint`` puts it), or ``None`` for a checkpoint kept anywhere else."""
    path = Path(checkpoint).absolute()
    run = path.parent.parent
    if path.parent.name != "checkpoints" or not any((run / f).is_file() for f in _RUN_FILES):
        return None
    return run


#: Files that make a directory a run's log directory (the logger's and LightningCLI's own, and our record).
_RUN_FILES = ("config.yaml", "hparams.yaml", "metrics.csv", RUN_RECORD)
#: Loggers that version their directory under ``save_dir``/``name`` (and take a string ``version`` as its name).
_VERSIONED_LOGGERS = ("CSVLogger", "TensorBoardLogger")


def _log_beside_run(trainer: Namespace, checkpoint: str, subcommand: str) -> None:
    """Point the logger of a command run on a trained checkpoint (``validate``, ``test``, ``predict``,
    ``evaluate``) at a new directory inside that checkpoint's run: ``version_N/validate``, then
    ``version_N/validate-1``, ... A new ``lightning_logs/version_M`` of its own would look like the newest run
    to ``report`` and ``--ckpt_path last``, and nothing would tie its outputs to the run they judge.

    Where Lightning's loggers put a run is ``save_dir/name/version``: the default CSV logger and a configured
    CSV or TensorBoard logger get ``save_dir`` = the run, no ``name``, and the directory as ``version``. Other
    loggers (W&B, MLflow) keep their own runs. A checkpoint outside a run directory changes nothing.
    """
    run = run_of(checkpoint)
    if run is None:
        return
    version = next(name for i in range(10_000)
                   if not (run / (name := subcommand if i == 0 else f"{subcommand}-{i}")).exists())
    where = {"save_dir": str(run), "name": "", "version": version}
    logger = trainer.get("logger")
    if logger in (None, True):
        trainer["logger"] = Namespace(class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(**where))
        return
    for item in logger if isinstance(logger, list) else [logger]:
        if isinstance(item, Namespace) and str(item.get("class_path")).rsplit(".", 1)[-1] in _VERSIONED_LOGGERS:
            item["init_args"] = item.get("init_args") or Namespace()
            item.init_args.update(Namespace(**where))


class RunRecord(Callback):
    """Writes :data:`~lightning_pref.report.RUN_RECORD` (``run.yaml``) in the command's log directory: which
    command made it (``report`` and ``--ckpt_path last`` look for ``fit`` runs) and, for a resumed ``fit``, the
    checkpoint and global step it resumed from (``report`` shows the earlier run's metrics up to that step). A
    command other than ``fit`` also prints one line saying where its log directory is.

    Args:
        command: the subcommand (``evaluate`` runs Lightning's ``predict`` stage, so the stage would not say).
        checkpoint: the command's ``--ckpt_path`` (Lightning sets ``trainer.ckpt_path`` only after ``setup``).
    """

    def __init__(self, command: str, checkpoint: str | None = None) -> None:
        self.command, self.checkpoint = command, checkpoint

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        if self.command != "fit":
            self._write(trainer, {"command": self.command, "checkpoint": _absolute(self.checkpoint)})

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        # the checkpoint is restored by now: global_step is the step the run goes on from
        resumed = _absolute(trainer.ckpt_path)
        self._write(trainer, {"command": "fit", "resumed_from": resumed,
                              "resumed_at_step": trainer.global_step if resumed else None})

    def teardown(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        if self.command in ("validate", "test") and trainer.logger is not None:
            log_dir = trainer.log_dir  # a collective: every rank asks
            if trainer.is_global_zero and log_dir:
                Console(highlight=False, soft_wrap=True).print(f"{self.command}: metrics in {log_dir}", markup=False)

    @staticmethod
    def _write(trainer: Trainer, record: dict[str, Any]) -> None:
        if trainer.logger is None:
            return
        log_dir = trainer.log_dir  # a collective: every rank asks
        if trainer.is_global_zero and log_dir:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            (Path(log_dir) / RUN_RECORD).write_text(yaml.safe_dump(record, sort_keys=False), encoding="utf-8")


def _absolute(path: str | Path | None) -> str | None:
    return str(Path(path).absolute()) if path else None


class SaveRunConfig(SaveConfigCallback):
    """LightningCLI's ``config.yaml`` in the run's log directory; without a logger there is no run directory
    (``default_root_dir`` is shared by every run), so nothing is written rather than refusing the next run."""

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        if trainer.logger is None:
            return
        super().setup(trainer, pl_module, stage)


def _last_checkpoint(config: Namespace, subcommand: str) -> Path | None:
    """``--ckpt_path last``: the ``last.ckpt`` of the newest earlier run that this config describes.

    Lightning's own ``last`` looks only in this run's new ``version_N`` directory, where there is none yet; this
    looks where this config's runs are (:func:`_run_checkpoints`), and takes only a run trained with the config's
    module, model and loss class: a run of another config that shares the directory is never resumed silently.
    Among those, a run trained with exactly the config's loss arguments wins; runs that differ only in them
    (``beta``) are listed rather than guessed between. The resumed run logs and checkpoints into a new version
    directory, so nothing earlier is overwritten.

    Returns:
        The checkpoint, or ``None`` for a ``fit`` where there is no checkpoint at all yet: like Lightning's
        ``ckpt_path="last"``, a new run starts (with a line saying so), so a requeue script that always passes
        ``--ckpt_path last`` works on its first launch too.

    Raises:
        UserInputError: no checkpoint to validate/predict/evaluate; checkpoints only of other configs (listed,
            with what differs); several candidates trained with different loss arguments (listed).
    """
    where, found = _run_checkpoints(config)
    if not found:
        if subcommand == "fit":
            rank_zero_info(f"--ckpt_path last: no checkpoint under {where} yet; starting a new run")
            return None
        raise UserInputError(f"--ckpt_path last: no checkpoint under {where}; give a path, or the "
                             "--trainer.default_root_dir (or logger save_dir) that fit wrote into")
    candidates, others = [], []
    for path in found:
        try:
            hparams = _read_checkpoint(str(path))["hyper_parameters"]
        except UserInputError:  # a truncated or foreign file is no candidate; a run's last.ckpt is its own to fix
            others.append(f"{path} (not a readable lightning-pref checkpoint)")
            continue
        differs = _differs_from_config(hparams, config.model)
        (others.append(f"{path} ({differs})") if differs else candidates.append((path, hparams)))
    if not candidates:
        raise UserInputError(f"--ckpt_path last: no checkpoint under {where} was trained with this config: "
                             f"{'; '.join(others)}; give one with --ckpt_path PATH and its run's config.yaml, or "
                             "start a new run in another --trainer.default_root_dir")
    configured = _init_args(config.model)
    exact = [(p, h) for p, h in candidates if _plain(h.get("loss")) == _plain(configured.get("loss"))]
    if exact:
        return exact[-1][0]
    losses = {_describe(h.get("loss")) for _, h in candidates}
    if len(losses) > 1:
        listed = "; ".join(f"{p} ({_describe(h.get('loss'))})" for p, h in candidates)
        raise UserInputError(f"--ckpt_path last: runs under {where} trained with different losses, none with "
                             f"the config's {_describe(configured.get('loss'))}: {listed}; give one with --ckpt_path")
    return candidates[-1][0]


def _run_checkpoints(config: Namespace) -> tuple[Path, list[Path]]:
    """Where this config's runs are, and their ``last.ckpt`` files, oldest run first.

    A run's checkpoints are where Lightning puts them: ``--checkpoint.dirpath`` if given; else
    ``<log dir>/checkpoints``, the log directory being ``save_dir/name/version_N`` of the config's CSV or
    TensorBoard logger (Lightning's default: ``default_root_dir/lightning_logs/version_N``), or
    ``default_root_dir`` itself without a logger.
    """
    trainer = config.trainer
    root = Path(trainer.get("default_root_dir") or ".")
    dirpath = config.get("checkpoint") and config.checkpoint.get("dirpath")
    if dirpath:
        return Path(dirpath), [p for p in [Path(dirpath) / "last.ckpt"] if p.is_file()]
    logger = trainer.get("logger")
    first = logger[0] if isinstance(logger, list) and logger else logger
    if first is False:
        return root, [p for p in [root / "checkpoints/last.ckpt"] if p.is_file()]
    if isinstance(first, Namespace) and str(first.get("class_path")).rsplit(".", 1)[-1] in _VERSIONED_LOGGERS:
        args = first.get("init_args") or Namespace()
        root = Path(args.get("save_dir") or root) / (args.get("name", "lightning_logs") or "")
    else:
        root = root / "lightning_logs"
    found = [p for p in root.glob("version_*/checkpoints/last.ckpt") if p.parts[-3].removeprefix("version_").isdigit()]
    return root, sorted(found, key=lambda p: int(p.parts[-3].removeprefix("version_")))


def _init_args(model: Any) -> dict[str, Any]:
    """The module's arguments of a config, written flat or as ``class_path``/``init_args``."""
    configured = _plain(model)
    return (configured.get("init_args") or {}) if "class_path" in configured else configured


def _class_of(plugin: Any) -> Any:
    """The class a plugin's config or hyperparameter names (whichever form of its path), or the value itself."""
    plugin = _plain(plugin)
    if isinstance(plugin, dict) and "class_path" in plugin:
        return pydoc.locate(plugin["class_path"]) or plugin["class_path"]
    return plugin


#: Module arguments that make a run another experiment when they name another class: what is trained with.
_PLUGIN_KEYS = ("loss", "estimator")


def _differs_from_config(hparams: dict[str, Any], model: Any) -> str | None:
    """Why a checkpoint is not one of the runs ``model`` (a module config) describes, or ``None``: another module
    class, model, or loss (estimator) class. Loss arguments may differ: the checkpoint's are restored."""
    trained, _ = _module_of(hparams.get("_class_path"))
    configured, _ = _module_of(_plain(model).get("class_path"))
    if trained != configured:
        return f"a {trained}, the config is for a {configured}"
    given = _init_args(model)
    for key in ("policy", "backbone"):
        if key in hparams and key in given and _plain(hparams[key]) != _plain(given[key]):
            return f"model.{key} {_describe(hparams[key])}, the config has {_describe(given[key])}"
    for key in _PLUGIN_KEYS:
        if key in hparams and key in given and _class_of(hparams[key]) != _class_of(given[key]):
            return f"model.{key} {_describe(hparams[key])}, the config has {_describe(given[key])}"
    return None


def _read_checkpoint(path: str) -> dict[str, Any]:
    """A lightning-pref checkpoint, read memory-mapped (cheap even for large ones); one line when it is missing,
    truncated or someone else's (Lightning would fail deep inside ``torch.load``)."""
    if not Path(path).is_file():
        raise UserInputError(f"--ckpt_path: no checkpoint file at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:  # noqa: BLE001 - zip, pickle and I/O errors all mean the same to the user
        raise UserInputError(
            f"--ckpt_path: {path} is not a readable checkpoint ({_first_line(err)}); it may be truncated by an "
            "interrupted save or copy: use another one (e.g. an earlier epoch=...ckpt)"
        ) from None
    hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
    if not {"policy", "backbone"} & set(hparams):
        raise UserInputError(f"--ckpt_path: {path} was not written by lightning-pref fit (no model in its hparams)")
    return checkpoint


#: Modules that write text: what ``predict`` and ``evaluate`` need.
_POLICY_MODULES = "PreferenceModule, OnPolicyModule or PolicyGradientModule"


def _module_of(class_path: str | None) -> tuple[str, str]:
    """``(class name, the option naming its model)`` of a module class path: ``model.policy`` for a policy,
    ``model.backbone`` for a reward model."""
    cls = pydoc.locate(class_path or DEFAULT_MODULE)
    name = (class_path or DEFAULT_MODULE).rsplit(".", 1)[-1]
    return name, getattr(cls, "model_field", "model.policy")


def _check_kind(checkpoint: dict[str, Any], model: Any, path: str, subcommand: str) -> None:
    """Refuse a checkpoint of another kind of model than the subcommand or the config needs, saying what the
    file is and what was expected: a reward model (which scores text) given to ``predict``/``evaluate``, or a
    reward-model checkpoint with a policy config (and the reverse), whose options do not even parse together."""
    hparams = checkpoint["hyper_parameters"]
    trained, trained_field = _module_of(hparams.get("_class_path"))
    trained_field = "model.backbone" if "backbone" in hparams else trained_field
    if subcommand in ("predict", "evaluate") and trained_field == "model.backbone":
        raise UserInputError(
            f"--ckpt_path: {path} is a reward-model checkpoint ({trained}): it scores texts and does not generate; "
            f"{subcommand} needs a policy checkpoint ({_POLICY_MODULES}). To judge with it: lightning-pref export "
            f"--ckpt_path {path} --output_dir rm, then --judge reward_model --judge.path rm"
        )
    configured, configured_field = _module_of(_plain(model).get("class_path"))
    if configured_field != trained_field:
        raise UserInputError(
            f"--ckpt_path: {path} is a {trained} checkpoint ({trained_field}), but the config is for a {configured} "
            f"({configured_field}); give the config it was trained with (its run directory's config.yaml)"
        )


def _check_matches(checkpoint: dict[str, Any], model: Any, path: str, argv: list[str]) -> None:
    """LightningCLI replaces the config's model options with the checkpoint's (the trained model and loss win).
    Say so where they differ; where the command line itself gives another model or loss, or the config (file or
    command line) another loss class, that contradicts the checkpoint: one line, exit 2."""
    hparams = checkpoint["hyper_parameters"]
    configured = _init_args(model)
    for key in ("policy", "backbone", *_PLUGIN_KEYS):
        trained, given = hparams.get(key), configured.get(key)
        if trained is None or given is None or _plain(trained) == _plain(given):
            continue
        on_command_line = any(a == f"--model.{key}" or a.startswith((f"--model.{key}.", f"--model.{key}="))
                              for a in argv)
        if on_command_line or (key in _PLUGIN_KEYS and _class_of(trained) != _class_of(given)):
            fix = f"drop --model.{key}" if on_command_line else "give the run's own config (its config.yaml)"
            raise UserInputError(
                f"--ckpt_path: {path} was trained with model.{key} {_describe(trained)}, but the "
                f"{'command line' if on_command_line else 'config'} gives {_describe(given)}; a checkpoint "
                f"restores what it was trained with: {fix}, or export the model and start a new run from it"
            )
        rank_zero_info(f"--ckpt_path: model.{key} {_describe(trained)} from the checkpoint (the config has "
                       f"{_describe(given)})")


def _plain(value: Any) -> Any:
    """Namespaces as dicts, for comparing a config value with a checkpoint's hyperparameter."""
    return value.as_dict() if isinstance(value, Namespace) else value


def _describe(value: Any) -> str:
    value = _plain(value)
    if isinstance(value, dict) and "class_path" in value:
        args = ", ".join(f"{k}={v!r}" for k, v in (value.get("init_args") or {}).items())
        return f"{value['class_path'].rsplit('.', 1)[-1]}({args})"
    return repr(value)


class _NoTips(logging.Filter):
    """Drops Lightning's advertising tips ("💡 Tip: ... install litlogger"), nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


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


def run(args: list[str] | None) -> None:
    """Run a training subcommand; ``args`` as the command line gives them (``None``: LightningCLI reads
    ``sys.argv``, which multi-process launchers re-run)."""
    quiet_console()
    load_plugins()  # third-party plugins' classes are known by class name too (--model.loss MyLoss)
    try:
        LightningPrefCLI(
            BaseModule, PreferenceDataModule, subclass_mode_model=True, trainer_class=PreferenceTrainer,
            save_config_callback=SaveRunConfig, parser_class=PrefParser, parser_kwargs={"parser_mode": "omegaconf"},
            args=args,
        )
    except MisconfigurationException as err:  # Lightning's own refusal of a setting: one line too
        raise UserInputError(str(err)) from None
