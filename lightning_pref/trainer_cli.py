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

import pydoc
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import jsonargparse._typehints
import torch
import yaml
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from omegaconf.errors import OmegaConfBaseException

from lightning_pref.base_module import BaseModule
from lightning_pref.checks import check_output_path
from lightning_pref.console import ModelSummary, ProgressBar, RunSummary, quiet_console
from lightning_pref.data import PreferenceDataModule
from lightning_pref.errors import UserInputError, out_of_memory, raised_in
from lightning_pref.evaluate import PreferenceTrainer
from lightning_pref.host_memory import HostMemory
from lightning_pref.predict import PredictionWriter
from lightning_pref.registry import REGISTRIES, UnknownPluginError, load_plugins
from lightning_pref.runs import (
    DEFAULT_MODULE,
    Checkpoints,
    RunRecord,
    SaveRunConfig,
    check_kind,
    check_matches,
    check_new_log_dirs,
    check_restored,
    discard_unused_log_dir,
    first_line,
    is_sharded_checkpoint,
    last_checkpoint,
    log_beside_run,
    read_checkpoint,
)
from lightning_pref.throughput import TokenThroughput

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
        if not self.exit_on_error:  # inner parsers' errors are their callers' to report
            super().error(message, ex)
        if cause is None:  # jsonargparse's: its tree of union attempts, cut to the error that ends it
            raise UserInputError(condense_parser_error(message))
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


_KEY = re.compile(r'(?:- )?Parser key "([^"]+)":\s*(.*)$')
_CLASS = re.compile(r"(?:- )?Problem with given class_path '([^']+)':\s*(.*)$")
_NOISE = re.compile(r"(?:- )?(Does not validate against any of the Union subtypes|Subtypes: .*|Errors:|"
                    r"Expected a <class 'NoneType'>|Given value( type)?: .*)$")


def _config_files(argv: list[str]) -> list[str]:
    """The ``--config`` (``-c``) files of a command line, in order."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.removeprefix("--config="))
    return files


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def check_config_file(path: str) -> None:
    """Refuse a ``--config`` file that is not a YAML mapping, naming the file, line and column and what is wrong
    (jsonargparse says "in "<unicode string>", line 2, column 1", or "Unexpected config" for an empty file).
    Missing files and directories are left to jsonargparse, whose messages name them."""
    file = Path(path)
    if not file.is_file():
        return
    try:
        data = yaml.load(file.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - safe loader
    except UnicodeDecodeError:
        raise UserInputError(f"--config: {path} is not UTF-8 text; a config is a YAML file") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        tab = " (YAML indents with spaces, not tabs)" if "\t" in str(err) or "cannot start any token" in str(err) \
            else ""
        raise UserInputError(f"--config: {path}{where}: {err.problem or err.context}{tab}") from None
    if data is None:
        raise UserInputError(f"--config: {path} is empty (or only comments); a config is a YAML mapping of options, "
                             "e.g. trainer: {max_steps: 100}")
    if not isinstance(data, dict):
        raise UserInputError(f"--config: {path} holds a YAML {type(data).__name__}, not a mapping of options (e.g. "
                             "trainer: {max_steps: 100})")


def condense_parser_error(message: str) -> str:
    """One line from jsonargparse's error text: its deepest error, after the option it belongs to (the ``Parser
    key`` lines above it, ``init_args`` left out) and, when a ``class_path`` was being tried, that class. A
    message of one line is kept as it is.

    E.g. ``model.kl.estimator: Expected a typing.Literal['k1', 'k2', 'k3']. Got value: k4``, or ``model.judge:
    No module named 'my' (class_path my.pkg.Judge)`` for the 25 lines jsonargparse writes for either."""
    lines = [(len(line) - len(line.lstrip()), line.strip()) for line in message.removeprefix("error: ").splitlines()]
    lines = [(indent, text) for indent, text in lines if text and not _NOISE.match(text)]
    leaves = []  # (indent, position, text): what is left of each line once its key or class is taken off
    for i, (indent, text) in enumerate(lines):
        match = _KEY.match(text) or _CLASS.match(text)
        rest = match.group(2) if match else text.removeprefix("- ")
        if rest:
            leaves.append((indent + (1 if match else 0), i, rest))
    if not leaves:
        return message.strip()
    depth, position, leaf = max(leaves, key=lambda leaf: (leaf[0], -leaf[1]))
    alternatives = [leaf]  # the union's other members tried at the same place: "a bool or one of auto, shared"
    for indent, i, text in leaves:
        if i > position and indent == depth and all(lines[j][0] >= depth for j in range(position, i)):
            alternatives.append(text.removeprefix("Expected a ") if leaf.startswith("Expected a ") else text)
    leaf = " or ".join(alternatives)
    keys: list[str] = []
    parent_class = None
    for indent, text in reversed(lines[: position + 1]):
        if indent >= depth:
            continue
        depth = indent
        if key := _KEY.match(text):
            keys[:0] = [k for k in key.group(1).split(".") if k != "init_args"]
        elif (cls := _CLASS.match(text)) and not keys and parent_class is None:
            parent_class = cls.group(1)
    head = f"{'.'.join(keys)}: " if keys else ""
    return head + leaf + (f" (class_path {parent_class})" if parent_class else "")


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    """``err`` and the exceptions it was raised from, outermost first."""
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def _user_error(err: BaseException | None) -> UserInputError | UnknownPluginError | None:
    """The user error that jsonargparse's own errors wrap, if any."""
    return next((e for e in _chain(err) if isinstance(e, (UserInputError, UnknownPluginError))), None)


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
        parser.link_arguments("model.val_data", "data.val_data", apply_on="instantiate")
        # Always-on callbacks, configurable as --checkpoint.*, --progress_bar.*, --predictions.*, --summary.*,
        # --throughput.*, --host_memory.*: a last.ckpt to resume or validate from, a progress bar showing loss and
        # reward accuracy, predict's JSONL, the summary at the end of fit, real tokens/s (and MFU) in the logs, and
        # freed host memory kept for the next step.
        parser.add_lightning_class_args(Checkpoints, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        parser.add_lightning_class_args(ProgressBar, "progress_bar")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(RunSummary, "summary")
        parser.add_lightning_class_args(TokenThroughput, "throughput")
        parser.add_lightning_class_args(ModelSummary, "model_summary")
        parser.add_lightning_class_args(HostMemory, "host_memory")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then settle ``--ckpt_path`` before LightningCLI reads the checkpoint's hyperparameters into the
        config: ``last`` becomes the newest ``last.ckpt`` of earlier runs, and a checkpoint that is missing,
        truncated, not ours, or trained with another policy or loss than the command line gives is one line."""
        self.argv = sys.argv[1:] if args is None else list(args)
        for path in _config_files(self.argv):
            check_config_file(path)
        try:
            super().parse_arguments(parser, args)
        except OmegaConfBaseException as err:  # an interpolation: omegaconf's multi-line text, then a traceback
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            key = next((line.removeprefix("full_key:").strip() for line in lines if line.startswith("full_key:")), "")
            raise UserInputError(f"{key.replace('.init_args', '') + ': ' if key else '--config: '}{lines[0]}; an "
                                 "interpolation ${...} refers to a key of the same config file") from None
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        config = self.config[subcommand]
        if config.trainer.get("default_root_dir"):  # else Lightning's logger fails on it with a traceback
            check_output_path("trainer.default_root_dir", config.trainer.default_root_dir, "directory")
        if config.get("ckpt_path") == "last":
            last = last_checkpoint(config, subcommand)
            config["ckpt_path"] = str(last) if last is not None else None
        path = config.get("ckpt_path")
        if path == "best":  # Lightning's: the best checkpoint of a fit earlier in the same process
            raise UserInputError("--ckpt_path: best names the best checkpoint of a fit in the same process, and this "
                                 "command starts a new one; give the checkpoint file (the run's checkpoints/ holds "
                                 "each one saved, named by epoch and step), or last")
        if path is not None and path not in ("hpc", "registry") and not is_sharded_checkpoint(path):
            checkpoint = read_checkpoint(path)
            check_kind(checkpoint, config.model, path, subcommand)
            check_matches(checkpoint, config.model, path, self.argv)
            if subcommand == "fit":
                check_restored(checkpoint, config.model, path, self.argv)
            else:
                log_beside_run(config.trainer, path, subcommand)
            steps, done = config.trainer.get("max_steps", -1), checkpoint.get("global_step", 0)
            if subcommand == "fit" and steps not in (None, -1) and done >= steps:  # Lightning: exit 0, nothing run
                raise UserInputError(f"trainer.max_steps: {steps}, and {path} is at step {done} already, so nothing "
                                     "is left to train; raise trainer.max_steps (it counts the whole run, the resumed "
                                     "steps included)")

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
            raise UserInputError(f"{self._option_prefix(cls)}{first_line(err)}") from err
        except Exception as err:  # noqa: BLE001 - e.g. a plugin's KeyError, a term's unexpected argument: the option
            if out_of_memory(err):  # loading a model onto a full device: not the class's arguments
                raise
            raise raised_in(f"{self._option_prefix(cls)}{cls.__name__}.__init__", err,
                            "check the class and its arguments") from err

    def _option_prefix(self, cls: type) -> str:
        config = self.config[self.subcommand] if self.subcommand else self.config
        option = _option_of(cls, config.as_dict())
        return f"{option}: " if option else ""

    def instantiate_classes(self) -> None:
        """As LightningCLI, but a user error raised while building the classes is its one line, not jsonargparse's
        wrapping of it."""
        try:
            super().instantiate_classes()
        except ValueError as err:
            cause = _user_error(err) or UserInputError(first_line(list(_chain(err))[-1]))
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
        trainer = self._instantiate_trainer(trainer_config, callbacks)  # LightningCLI's: adds the config callback
        check_new_log_dirs(trainer)
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        """As LightningCLI; a command refused once the trainer had started (a check in a hook) takes back the log
        directory it had only begun, so refused tries do not pile up as ``version_N`` or ``validate-N``."""
        try:
            super()._run_subcommand(subcommand)
        except UserInputError:
            discard_unused_log_dir(self.trainer)
            raise


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
             "summary": None, "throughput": None, "model_summary": "enable_model_summary",
             "host_memory": None}


def run(args: list[str] | None) -> bool:
    """Run a training subcommand; ``args`` as the command line gives them (``None``: LightningCLI reads
    ``sys.argv``, which multi-process launchers re-run).

    Returns:
        Whether this process took part in a distributed run (its process group is down again on return).
    """
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
    finally:
        # Lightning leaves the process group up: taken down, so that a script's next command starts afresh. Its
        # gloo worker threads live on (the device mesh and sharded parameters still hold the group), which is why
        # the command ends without finalizing the interpreter after such a run (`cli.console`).
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:
            torch.distributed.destroy_process_group()
    return distributed
