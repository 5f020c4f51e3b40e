"""``lightning-pref``: LightningCLI over :class:`PreferenceModule` and :class:`PreferenceDataModule`.

Subcommands: ``fit``, ``validate``, ``test``, ``predict`` (Lightning's), ``losses`` (the loss table),
``export`` (the trained policy as a Hugging Face model directory) and ``report`` (plots and an HTML page of a run).
A loss is chosen by registered name (``--model.loss ipo``), class name (``IPOLoss``) or import path
(``my_pkg.losses.MyLoss``), on the command line or as ``loss: {class_path: kto, init_args: {...}}`` in YAML.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser, set_loader
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import lightning_pref.losses  # noqa: F401  (registers the built-in losses)
from lightning_pref.data import PreferenceDataModule
from lightning_pref.errors import TrainingError, UserInputError
from lightning_pref.losses.base import PreferenceLoss
from lightning_pref.module import PreferenceModule
from lightning_pref.registry import get_loss_class, list_losses, load_plugins, unknown_loss_message

PARSER_MODE = "lightning_pref"
_LOSS_FLAGS = ("--model.loss", "--model.loss.class_path")


def resolve_loss_name(value: Any) -> Any:
    """Map a registered loss name or loss class name to its import path; leave anything else alone.

    jsonargparse resolves class names and import paths itself but knows nothing of registered names, so they
    are translated before parsing. A bare word that is neither is an error listing the registered losses.
    """
    if not isinstance(value, str) or "." in value or value.startswith(("{", "[")) or not value.isidentifier():
        return value
    names = list_losses()
    if value in names:
        cls = get_loss_class(value)
    else:
        cls = next((c for c in map(get_loss_class, names) if c.__name__ == value), None)
        if cls is None:
            raise UserInputError(f"model.loss: {unknown_loss_message(value)}")
    return f"{cls.__module__}.{cls.__qualname__}"


def _resolve_in_config(node: Any) -> Any:
    """Resolve the value of every ``loss`` key in a loaded config (``loss: kto`` or ``class_path: kto``)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "loss" and isinstance(value, dict) and "class_path" in value:
                value["class_path"] = resolve_loss_name(value["class_path"])
            elif key == "loss":
                node[key] = resolve_loss_name(value)
            else:
                _resolve_in_config(value)
    return node


def resolve_loss_args(argv: list[str]) -> list[str]:
    """Resolve loss names given on the command line (``--model.loss ipo`` or ``--model.loss=ipo``)."""
    out = list(argv)
    for i, arg in enumerate(out):
        flag, eq, value = arg.partition("=")
        if flag in _LOSS_FLAGS and eq:
            out[i] = f"{flag}={resolve_loss_name(value)}"
        elif arg in _LOSS_FLAGS and i + 1 < len(out):
            out[i + 1] = resolve_loss_name(out[i + 1])
    return out


def _load_config(text: str) -> Any:
    """YAML with OmegaConf ``${...}`` interpolation (as ``parser_mode="omegaconf"``), plus loss names."""
    value = yaml.safe_load(text)
    if isinstance(value, dict):
        value = OmegaConf.to_object(OmegaConf.create(value))
    return _resolve_in_config(value)


def _register_parser_mode() -> None:
    set_loader(PARSER_MODE, _load_config, (yaml.YAMLError, OmegaConfBaseException))


class LightningPrefCLI(LightningCLI):
    """LightningCLI with the tokenizer and the loss's data needs linked from the model to the data module."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.tokenizer", "data.tokenizer", apply_on="instantiate")
        parser.link_arguments("model.requires_kl_baseline", "data.kl_baseline", apply_on="instantiate")
        # Always-on callbacks, configurable as --checkpoint.* and --progress_bar.*: a last.ckpt to resume or
        # validate from, and a progress bar showing loss and reward accuracy.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        parser.add_lightning_class_args(RichProgressBar, "progress_bar")

    def before_fit(self) -> None:
        self._resolve_last_checkpoint()

    def before_validate(self) -> None:
        self._resolve_last_checkpoint()

    def before_test(self) -> None:
        self._resolve_last_checkpoint()

    def _resolve_last_checkpoint(self) -> None:
        """``--ckpt_path last``: the newest ``last.ckpt`` of earlier runs under ``default_root_dir``.

        Lightning's own ``last`` looks only in this run's new ``version_N`` directory, where there is none yet.
        The resumed run logs and checkpoints into a new version directory, so nothing earlier is overwritten.
        """
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") != "last":
            return
        root = Path(config.trainer.get("default_root_dir") or ".")
        found = sorted(root.glob("lightning_logs/version_*/checkpoints/last.ckpt"), key=_version_number)
        if not found:
            raise UserInputError(
                f"--ckpt_path last: no lightning_logs/version_*/checkpoints/last.ckpt under {root}; give a path"
            )
        config["ckpt_path"] = str(found[-1])

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # A CSV logger under default_root_dir unless the config names a logger: Lightning's own default would
        # switch to TensorBoard whenever it happens to be installed, changing where metrics land.
        trainer_config = self.config_init[self.subcommand].trainer if self.subcommand else self.config_init.trainer
        if trainer_config.get("logger") in (None, True) and "logger" not in kwargs:
            kwargs["logger"] = CSVLogger(trainer_config.get("default_root_dir") or ".")
        return super().instantiate_trainer(**kwargs)


def _version_number(path: Path) -> int:
    return int(path.parts[-3].removeprefix("version_"))


def print_losses() -> None:
    """Print the table of registered losses."""
    table = Table(title="lightning-pref losses")
    for column in ("name", "class", "paper", "reference?", "paired?", "parameters"):
        table.add_column(column)
    for name in list_losses():
        cls = get_loss_class(name)
        params = inspect.signature(cls.__init__).parameters.values()
        shown = ", ".join(
            p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
            for p in params
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        )
        table.add_row(name, cls.__name__, cls.paper, _yes(cls.requires_reference), _yes(cls.paired), shown)
    Console().print(table)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-pref`` console script; ``args`` replaces ``sys.argv[1:]`` (for scripts)."""
    argv = list(sys.argv[1:] if args is None else args)
    if args is not None:
        # LightningCLI warns when given args while sys.argv holds flags of the calling script or test runner.
        sys.argv = sys.argv[:1]
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
            Console().print(f"exported the policy to {out} (load it with AutoModelForCausalLM.from_pretrained)")
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
        LightningPrefCLI(
            PreferenceModule,
            PreferenceDataModule,
            parser_kwargs={"parser_mode": PARSER_MODE},
            args=resolve_loss_args(argv),
        )
    except (UserInputError, TrainingError, MisconfigurationException) as err:
        # escaped: a message's own brackets (e.g. "lightning-pref[report]") are text, not rich markup
        Console(stderr=True, highlight=False).print(f"[bold red]error:[/bold red] {escape(str(err))}", soft_wrap=True)
        sys.exit(2)


__all__ = ["LightningPrefCLI", "PreferenceLoss", "main"]
