"""``lightning-pref``: LightningCLI over :class:`PreferenceModule` and :class:`PreferenceDataModule`.

Subcommands: ``fit``, ``validate``, ``test``, ``predict`` (Lightning's), ``losses`` (the loss table),
``export`` (the trained policy as a Hugging Face model directory) and ``report`` (plots and an HTML page of a run).
A loss is chosen by registered name (``--model.loss ipo``), class name (``IPOLoss``) or import path
(``my_pkg.losses.MyLoss``), on the command line or as ``loss: {class_path: kto, init_args: {...}}`` in YAML.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentParser, set_loader
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import lightning_pref.judges  # noqa: F401  (registers the built-in judges)
import lightning_pref.losses  # noqa: F401  (registers the built-in losses)
import lightning_pref.reward  # noqa: F401  (registers the built-in reward losses)
from lightning_pref.data import PreferenceDataModule
from lightning_pref.errors import TrainingError, UserInputError
from lightning_pref.evaluate import PreferenceTrainer
from lightning_pref.losses.base import PreferenceLoss
from lightning_pref.module import PreferenceModule
from lightning_pref.predict import PredictionWriter
from lightning_pref.registry import JUDGES, LOSSES, REWARD_LOSSES, Registry, load_plugins
from lightning_pref.report import RunSummary
from lightning_pref.throughput import TokenThroughput

PARSER_MODE = "lightning_pref"
#: Options whose value may be a registered plugin name, and the registry that names them: the module's plugin
#: arguments (``PreferenceModule.plugin_registries``: ``model.loss``, ...; :func:`use_module` sets them for the
#: module a run trains) and ``evaluate``'s ``judge``.
NAMED_OPTIONS: dict[str, Registry] = {"model.loss": LOSSES, "judge": JUDGES}


def use_module(module_class: type) -> None:
    """Resolve plugin names for ``module_class``'s arguments (``model.loss`` of a reward model names a reward
    loss), whether given flat (``model.loss``) or as a subclass's ``model.init_args.loss``."""
    NAMED_OPTIONS.clear()
    for name, registry in getattr(module_class, "plugin_registries", {}).items():
        NAMED_OPTIONS[f"model.{name}"] = registry
        NAMED_OPTIONS[f"model.init_args.{name}"] = registry
    NAMED_OPTIONS["judge"] = JUDGES


def module_class(argv: list[str]) -> type | None:
    """The module a run names with ``model: {class_path: ...}`` in a ``--config`` file (or ``--model.class_path``
    on the command line), e.g. ``configs/reward.yaml``; ``None``: ``PreferenceModule``, given flat."""
    path = None
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
        if flag == "--model.class_path":
            path = value
        elif flag == "--config" and Path(value).is_file():
            try:
                config = yaml.safe_load(Path(value).read_text())
            except yaml.YAMLError:
                continue  # the parser reports it, with the file's name
            model = config.get("model") if isinstance(config, dict) else None
            if isinstance(model, dict) and isinstance(model.get("class_path"), str):
                path = model["class_path"]
    if path is None:
        return None
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise UserInputError(f"model.class_path: cannot import {path!r}; e.g. lightning_pref.RewardModule") from None
    return cls


def resolve_name(value: Any, registry: Registry, option: str) -> Any:
    """Map a registered name (or a registered class's name) to its import path; leave anything else alone.

    jsonargparse resolves class names and import paths itself but knows nothing of registered names, so they
    are translated before parsing. A bare word that is neither is an error listing the registered names.
    """
    if not isinstance(value, str) or "." in value or value.startswith(("{", "[")) or not value.isidentifier():
        return value
    cls = registry.resolve(value)
    if cls is None:
        raise UserInputError(f"{option}: {registry.unknown_message(value)}")
    return f"{cls.__module__}.{cls.__qualname__}"


def resolve_loss_name(value: Any) -> Any:
    """:func:`resolve_name` for ``model.loss``."""
    return resolve_name(value, LOSSES, "model.loss")


def _resolve_in_config(config: Any) -> Any:
    """Resolve registered names given for the :data:`NAMED_OPTIONS` in a loaded config (``loss: kto`` or
    ``class_path: kto``). Only those keys: anything else called ``loss`` (a callback's argument, say) is left
    alone."""
    for option, registry in NAMED_OPTIONS.items():
        *parents, key = option.split(".")
        node = config
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if not isinstance(node, dict) or key not in node:
            continue
        value = node[key]
        if isinstance(value, dict) and "class_path" in value:
            value["class_path"] = resolve_name(value["class_path"], registry, option)
        else:
            node[key] = resolve_name(value, registry, option)
    return config


def resolve_loss_args(argv: list[str]) -> list[str]:
    """Resolve registered names given on the command line (``--model.loss ipo``, ``--judge=no_shouting``,
    ``--model.loss.class_path ipo``)."""
    flags = {f"--{o}{suffix}": (r, o) for o, r in NAMED_OPTIONS.items() for suffix in ("", ".class_path")}
    out = list(argv)
    for i, arg in enumerate(out):
        flag, eq, value = arg.partition("=")
        if flag in flags and eq:
            out[i] = f"{flag}={resolve_name(value, *flags[flag])}"
        elif arg in flags and i + 1 < len(out):
            out[i + 1] = resolve_name(out[i + 1], *flags[arg])
    return out


def _load_config(text: str) -> Any:
    """YAML with OmegaConf ``${...}`` interpolation (as ``parser_mode="omegaconf"``), plus loss names."""
    value = yaml.safe_load(text)
    if isinstance(value, dict):
        value = OmegaConf.to_object(OmegaConf.create(value))
    return _resolve_in_config(value)


def _register_parser_mode() -> None:
    set_loader(PARSER_MODE, _load_config, (yaml.YAMLError, OmegaConfBaseException))


class ProgressBar(RichProgressBar):
    """Rich's progress bar without Lightning's run-length artefacts: no ``Epoch 0/-2`` when the run is bounded
    by ``max_steps`` rather than epochs, and no ``v_num`` (the log directory's version) among the metrics."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:
            return f"Epoch {current_epoch}"
        return super()._get_train_description(current_epoch)

    def get_metrics(self, trainer: Trainer, pl_module: Any) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


#: Always-on callbacks (configured as ``--<key>.*``), and the Trainer flag that turns each off.
ALWAYS_ON = {"checkpoint": "enable_checkpointing", "progress_bar": "enable_progress_bar", "predictions": None,
             "summary": None, "throughput": None}


class LightningPrefCLI(LightningCLI):
    """LightningCLI with the tokenizer and the loss's data needs linked from the model to the data module, the
    ``evaluate`` subcommand, and always-on callbacks that yield to Lightning's own flags."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "evaluate": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser) -> None:
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

    def _parse_ckpt_path(self) -> None:
        """LightningCLI rebuilds the trained model: it reads the checkpoint's hyperparameters into the model
        config. Options the command line gives explicitly (``--model.generation.max_new_tokens 32``) still win;
        a contradicting policy or loss has already been refused (:meth:`parse_arguments`)."""
        subcommand = self.config.get("subcommand")
        before = self.config.clone() if subcommand else None
        super()._parse_ckpt_path()
        if before is None:
            return
        for arg in sys.argv[1:]:
            key = arg.removeprefix("--").partition("=")[0]
            if not key.startswith("model."):
                continue
            for name in (key, key.replace("model.", "model.init_args.", 1)):  # flat, or a subclass's
                if f"{subcommand}.{name}" in before:
                    self.config[f"{subcommand}.{name}"] = before[f"{subcommand}.{name}"]
                    break

    def instantiate_classes(self) -> None:
        """Instantiate as LightningCLI does; an argument a constructor refuses (``--model.loss.beta -1``) is one
        line naming the option, not a traceback (jsonargparse wraps such errors in its own)."""
        try:
            super().instantiate_classes()
        except ValueError as err:
            raise constructor_error(err, self.config[self.subcommand] if self.subcommand else self.config) from None

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse, then settle ``--ckpt_path`` before LightningCLI reads the checkpoint's hyperparameters into the
        config: ``last`` becomes the newest ``last.ckpt`` of earlier runs, and a checkpoint that is missing,
        truncated, not ours, or trained with another policy or loss than the config gives is one line."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand not in ("fit", "validate", "test", "predict", "evaluate"):
            return
        config = self.config[subcommand]
        if config.get("ckpt_path") == "last":
            config["ckpt_path"] = str(_last_checkpoint(Path(config.trainer.get("default_root_dir") or ".")))
        path = config.get("ckpt_path")
        if path is not None and path not in ("best", "hpc", "registry") and not Path(path).is_dir():
            given = sys.argv[1:] if args is None else list(args)
            _check_matches(_read_checkpoint(path), config.model, path, given)

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
        return self._instantiate_trainer(trainer_config, callbacks)  # LightningCLI's: adds the config callback


class SaveRunConfig(SaveConfigCallback):
    """LightningCLI's ``config.yaml`` in the run's log directory; without a logger there is no run directory
    (``default_root_dir`` is shared by every run), so nothing is written rather than refusing the next run."""

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        if trainer.logger is None:
            return
        super().setup(trainer, pl_module, stage)


def _version_number(path: Path) -> int:
    return int(path.parts[-3].removeprefix("version_"))


def _last_checkpoint(root: Path) -> Path:
    """``--ckpt_path last``: the newest ``last.ckpt`` of earlier runs under ``default_root_dir``.

    Lightning's own ``last`` looks only in this run's new ``version_N`` directory, where there is none yet. The
    resumed run logs and checkpoints into a new version directory, so nothing earlier is overwritten.
    """
    found = sorted(root.glob("lightning_logs/version_*/checkpoints/last.ckpt"), key=_version_number)
    if not found:
        raise UserInputError(f"--ckpt_path last: no lightning_logs/version_*/checkpoints/last.ckpt under {root}; give a path")
    return found[-1]


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


def _check_matches(checkpoint: dict[str, Any], model: Any, path: str, argv: list[str]) -> None:
    """LightningCLI replaces the config's model options with the checkpoint's (the trained model and loss win).
    Say so where they differ; and where the command line itself gives another model or loss, that contradicts
    the checkpoint: one line, exit 2."""
    hparams = checkpoint["hyper_parameters"]
    configured = model.as_dict() if hasattr(model, "as_dict") else dict(model)
    configured = configured.get("init_args", configured) if "class_path" in configured else configured
    for key in ("policy", "backbone", "loss"):
        trained, given = hparams.get(key), configured.get(key)
        if trained is None or given is None or _plain(trained) == _plain(given):
            continue
        if any(a == f"--model.{key}" or a.startswith((f"--model.{key}.", f"--model.{key}=")) for a in argv):
            raise UserInputError(
                f"--ckpt_path: {path} was trained with model.{key} {_describe(trained)}, but the command line "
                f"gives {_describe(given)}; a checkpoint restores what it was trained with: drop --model.{key}, "
                "or export the model and start a new run from it"
            )
        rank_zero_info(f"--ckpt_path: model.{key} {_describe(trained)} from the checkpoint (the config has "
                       f"{_describe(given)})")


def _plain(value: Any) -> Any:
    """Namespaces as dicts, for comparing a config value with a checkpoint's hyperparameter."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _describe(value: Any) -> str:
    value = _plain(value)
    if isinstance(value, dict) and "class_path" in value:
        args = ", ".join(f"{k}={v!r}" for k, v in (value.get("init_args") or {}).items())
        return f"{value['class_path'].rsplit('.', 1)[-1]}({args})"
    return repr(value)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def constructor_error(err: ValueError, config: Any) -> UserInputError:
    """One line for an argument a constructor refused: ``<option>: <the constructor's own message>``.

    The option is found from the class whose ``__init__`` raised (the outermost one the config names, so a term
    of a weighted loss is reported under ``model.loss``): the config key whose ``class_path`` is that class, or
    ``model``/``data`` for the module and data module.
    """
    original: BaseException = err
    while original.__cause__ is not None:  # jsonargparse re-raises a constructor's error as its own
        original = original.__cause__
    if isinstance(original, UserInputError):
        return original
    paths = {"lightning_pref.module.PreferenceModule": "model", "lightning_pref.data.datamodule.PreferenceDataModule": "data"}
    for key, value in _flatten(config):
        if key.endswith(".class_path") and isinstance(value, str):
            paths.setdefault(value, key.removesuffix(".class_path"))
    for frame, _ in traceback.walk_tb(original.__traceback__):
        owner = frame.f_locals.get("self") if frame.f_code.co_name == "__init__" else None
        if owner is not None:
            cls = type(owner)
            option = paths.get(f"{cls.__module__}.{cls.__qualname__}")
            if option is not None:
                return UserInputError(f"{option}: {_first_line(original)}")
    return UserInputError(_first_line(original))


def _flatten(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    items = node.items() if hasattr(node, "items") else []
    out = []
    for key, value in items:
        name = f"{prefix}{key}"
        out.append((name, value))
        if hasattr(value, "items"):
            out += _flatten(value, f"{name}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                out += _flatten(item, f"{name}.{i}.")
    return out


def print_losses() -> None:
    """Print the tables of registered losses: preference losses, then reward-model losses."""
    console = Console()
    for registry, title, flags in ((LOSSES, "lightning-pref losses (PreferenceModule)", True),
                                   (REWARD_LOSSES, "reward losses (RewardModule)", False)):
        table = Table(title=title)
        columns = ("name", "class", "paper", *(("reference?", "paired?") if flags else ()), "parameters")
        for column in columns:
            table.add_column(column)
        for name in registry.names():
            cls = registry.get(name)
            params = inspect.signature(cls.__init__).parameters.values()
            shown = ", ".join(
                p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
                for p in params
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            )
            extra = (_yes(cls.requires_reference), _yes(cls.paired)) if flags else ()
            table.add_row(name, cls.__name__, cls.paper, *extra, shown)
        console.print(table)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


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


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-pref`` console script; ``args`` replaces ``sys.argv[1:]`` (for scripts)."""
    argv = list(sys.argv[1:] if args is None else args)
    quiet_console()
    load_plugins()  # third-party losses must be registered before names are resolved
    try:
        if argv[:1] == ["losses"]:
            print_losses()
            return
        if argv[:1] == ["export"]:
            from lightning_pref.export import export_checkpoint

            parser = ArgumentParser(prog="lightning-pref export", description=export_checkpoint.__doc__)
            parser.add_function_arguments(export_checkpoint, as_positional=False)
            out = export_checkpoint(**parser.parse_args(argv[1:]).as_dict())
            kind = "AutoModelForSequenceClassification" if (out / "config.json").read_text().count(
                "ForSequenceClassification") else "AutoModelForCausalLM"
            Console(highlight=False).print(f"exported to {out} (load it with {kind}.from_pretrained)", soft_wrap=True)
            return
        if argv[:1] == ["report"]:
            from lightning_pref.report import write_report

            parser = ArgumentParser(prog="lightning-pref report", description=write_report.__doc__)
            parser.add_function_arguments(write_report, as_positional=True)
            given = parser.parse_args(argv[1:]).as_dict()
            report = write_report(**given)
            console = Console(highlight=False)
            if report.run_dir != Path(given["run_dir"]):
                console.print(f"newest run under {given['run_dir']}: {report.run_dir}", markup=False, soft_wrap=True)
            console.print(f"wrote {report.html} and {len(report.plots) + bool(report.overview)} PNGs beside it",
                          markup=False, soft_wrap=True)
            return
        _register_parser_mode()
        # LightningCLI reads the (loss-resolved) arguments from sys.argv, and multi-process launchers re-run
        # sys.argv: given as both, it would warn that args and sys.argv disagree.
        chosen = module_class(argv)
        use_module(chosen or PreferenceModule)
        saved, sys.argv = sys.argv, [sys.argv[0], *resolve_loss_args(argv)]
        try:
            LightningPrefCLI(
                chosen or PreferenceModule, PreferenceDataModule, subclass_mode_model=chosen is not None,
                trainer_class=PreferenceTrainer, save_config_callback=SaveRunConfig,
                parser_kwargs={"parser_mode": PARSER_MODE},
            )
        finally:
            sys.argv = saved
            use_module(PreferenceModule)
    except (UserInputError, TrainingError, MisconfigurationException) as err:
        # escaped: a message's own brackets (e.g. "lightning-pref[report]") are text, not rich markup
        Console(stderr=True, highlight=False).print(f"[bold red]error:[/bold red] {escape(str(err))}", soft_wrap=True)
        sys.exit(2)


__all__ = ["LightningPrefCLI", "PreferenceLoss", "main"]
