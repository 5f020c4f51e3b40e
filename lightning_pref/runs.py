"""Runs on disk, as the training subcommands find and record them: which directory a checkpoint's run is, where a
command run on a checkpoint logs (beside that run, never as a new ``version_N``), the ``run.yaml`` record each
command writes, what ``--ckpt_path last`` resolves to, and the checks that a checkpoint is the kind and the
experiment the config describes. Used by :mod:`lightning_pref.trainer_cli`; each refusal is one line."""

from __future__ import annotations

import json
import os
import pydoc
import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info
from rich.console import Console

from lightning_pref.errors import UserInputError
from lightning_pref.report import RUN_RECORD

#: The module a config gets when it names none; jsonargparse normalizes class paths to this shortest form.
DEFAULT_MODULE = "lightning_pref.PreferenceModule"


def first_line(err: BaseException) -> str:
    """An error's first line (its type's name if it has no text): what a one-line message quotes."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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


def log_beside_run(trainer: Namespace, checkpoint: str, subcommand: str) -> None:
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


def check_new_log_dirs(trainer: Trainer) -> None:
    """Refuse a log directory that already holds files (a logger given a fixed ``version`` that an earlier run
    used): Lightning's CSVLogger deletes the ``metrics.csv`` it finds there, and LightningCLI would then refuse to
    write ``config.yaml`` over the earlier one, after the loss. Checked by the first process only: the others start
    after it has made the directory."""
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
        return
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None)
        if log_dir and Path(log_dir).is_dir() and any(Path(log_dir).iterdir()):
            raise UserInputError(
                f"trainer.logger: {log_dir} already holds a run's files, which this run would replace (its logger "
                "deletes metrics.csv); give the logger another version, or none: each run, resumed ones too, then "
                "gets a new version_N")


#: What a command writes in its log directory before it runs anything (LightningCLI's config, the logger's
#: hyperparameters, :class:`RunRecord`'s record): a directory holding nothing else has no results in it.
_METADATA = frozenset({"config.yaml", "hparams.yaml", RUN_RECORD})


def discard_unused_log_dir(trainer: Trainer) -> None:
    """Remove the log directory of a command that was refused before it wrote anything but its metadata."""
    logger = trainer.logger
    log_dir = Path(logger.log_dir) if trainer.is_global_zero and getattr(logger, "log_dir", None) else None
    if log_dir is None or not log_dir.is_dir():
        return
    entries = list(log_dir.iterdir())
    if all(entry.is_file() and entry.name in _METADATA for entry in entries):
        for entry in entries:
            entry.unlink()
        log_dir.rmdir()


def _absolute(path: str | Path | None) -> str | None:
    return str(Path(path).absolute()) if path else None


class SaveRunConfig(SaveConfigCallback):
    """LightningCLI's ``config.yaml`` in the run's log directory; without a logger there is no run directory
    (``default_root_dir`` is shared by every run), so nothing is written rather than refusing the next run."""

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        if trainer.logger is None:
            return
        super().setup(trainer, pl_module, stage)


def last_checkpoint(config: Namespace, subcommand: str) -> Path | None:
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
            hparams = read_checkpoint(str(path))["hyper_parameters"]
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


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A directory that FSDP or FSDP2 wrote as one checkpoint (its ``meta.pt`` beside the shards)."""
    return (Path(path) / "meta.pt").is_file()


def read_checkpoint(path: str | Path, mmap: bool = True) -> dict[str, Any]:
    """A lightning-pref checkpoint (policy or reward model), read to CPU, memory-mapped unless ``mmap`` is false
    (cheap even for large ones); one line when it is missing, a directory, truncated or someone else's (Lightning
    and ``torch.load`` would fail deep inside, or advise re-saving it)."""
    if is_sharded_checkpoint(path):  # the training commands hand these to Lightning before reading them here
        raise UserInputError(f"--ckpt_path: {path} is a sharded (FSDP) checkpoint, and this command reads a single "
                             ".ckpt file")
    if Path(path).is_dir():
        if (Path(path) / "config.json").is_file() or (Path(path) / "adapter_config.json").is_file():
            raise UserInputError(f"--ckpt_path: {path} is a Hugging Face model directory (an export), not a training "
                                 f"checkpoint; to train or generate from it give --model.policy {path}")
        inside = next((c for c in (Path(path) / "checkpoints/last.ckpt", Path(path) / "last.ckpt") if c.is_file()),
                      None)
        hint = f", e.g. {inside}" if inside is not None else " (a .ckpt file)"
        raise UserInputError(f"--ckpt_path: {path} is a directory, not a checkpoint; give a checkpoint in it{hint}")
    if not Path(path).is_file():
        raise UserInputError(f"--ckpt_path: no checkpoint file at {path}")
    try:
        if not zipfile.is_zipfile(path):  # torch's own message would advise re-saving it with torch.save
            raise ValueError("not a PyTorch archive, which every .ckpt that fit saves is")
        checkpoint = torch.load(path, map_location="cpu", mmap=mmap, weights_only=False)
    except Exception as err:  # noqa: BLE001 - zip, pickle and I/O errors all mean the same to the user
        raise UserInputError(
            f"--ckpt_path: {path} is not a readable checkpoint ({first_line(err)}); it may be truncated by an "
            "interrupted save or copy: use another one (e.g. an earlier epoch=...ckpt)"
        ) from None
    hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
    if not {"policy", "backbone"} & set(hparams):
        raise UserInputError(f"--ckpt_path: {path} was not written by lightning-pref fit (no model in its hparams)")
    return checkpoint


class Checkpoints(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (``--checkpoint.*``), which also saves ``last.ckpt`` when training ends on
    a step it has not saved (the ``epoch=...-step=...ckpt`` files stay those of its schedule: by then Lightning
    counts the stopped epoch as done, and would name the file after the next one).

    Lightning saves after each validation when a run validates within its epoch, so a run whose ``max_steps``
    fell between two validations ended with checkpoints of its last validation, steps behind the policy it had
    trained, and the ``export`` command printed at the end exported that older policy.
    """

    @property
    def state_key(self) -> str:
        """Lightning's key, under ``ModelCheckpoint``'s name: checkpoints saved before this class resume its state."""
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def on_train_end(self, trainer: Trainer, pl_module: Any) -> None:
        if self._should_skip_saving_checkpoint(trainer):  # already saved at this step, or not fitting
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


#: Modules that write text: what ``predict`` and ``evaluate`` need.
_POLICY_MODULES = "PreferenceModule, OnPolicyModule or PolicyGradientModule"


def _module_of(class_path: str | None) -> tuple[str, str]:
    """``(class name, the option naming its model)`` of a module class path: ``model.policy`` for a policy,
    ``model.backbone`` for a reward model."""
    cls = pydoc.locate(class_path or DEFAULT_MODULE)
    name = (class_path or DEFAULT_MODULE).rsplit(".", 1)[-1]
    return name, getattr(cls, "model_field", "model.policy")


def check_kind(checkpoint: dict[str, Any], model: Any, path: str, subcommand: str) -> None:
    """Refuse a checkpoint of another kind of model than the subcommand or the config needs, saying what the
    file is and what was expected: a reward model (which scores text) given to ``predict``/``evaluate``, a
    reward-model checkpoint with a policy config (and the reverse), whose options do not even parse together, or
    a ``fit`` resumed under another module than it was trained with (its loop and state are another's)."""
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
    if subcommand == "fit" and trained != configured:  # e.g. on-policy DPO resumed as offline DPO: another loop
        raise UserInputError(
            f"--ckpt_path: {path} is a {trained} checkpoint, but the config trains a {configured}; a resumed fit "
            "continues the training it was: give the config it was trained with (its run directory's config.yaml), "
            "or export the model and start the new training from it (--model.policy DIR)"
        )


def check_matches(checkpoint: dict[str, Any], model: Any, path: str, argv: list[str]) -> None:
    """LightningCLI replaces the config's model options with the checkpoint's (the trained model and loss win).
    Say so where they differ; where the command line itself gives another model or loss, or the config (file or
    command line) another loss class, that contradicts the checkpoint: one line, exit 2."""
    hparams = checkpoint["hyper_parameters"]
    configured = _init_args(model)
    for key in ("policy", "backbone", *_PLUGIN_KEYS):
        trained, given = hparams.get(key), configured.get(key)
        if trained is None or given is None or _plain(trained) == _plain(given):
            continue
        on_command_line = _flag(argv, key) is not None
        if on_command_line or (key in _PLUGIN_KEYS and _class_of(trained) != _class_of(given)):
            fix = f"drop --model.{key}" if on_command_line else "give the run's own config (its config.yaml)"
            raise UserInputError(
                f"--ckpt_path: {path} was trained with model.{key} {_describe(trained)}, but the "
                f"{'command line' if on_command_line else 'config'} gives {_describe(given)}; a checkpoint "
                f"restores what it was trained with: {fix}, or export the model and start a new run from it"
            )
        rank_zero_info(f"--ckpt_path: model.{key} {_describe(trained)} from the checkpoint (the config has "
                       f"{_describe(given)})")


def check_restored(checkpoint: dict[str, Any], model: Any, path: str, argv: list[str]) -> None:
    """Refuse, when resuming a fit, a value of an option whose effect the checkpoint carries (the module's
    ``restored_by_checkpoint``: a new learning rate would be the optimizer state's old one, a new seed would
    rebuild a random-init reference apart from its policy, a new LoRA alpha would rescale the trained adapter)
    that differs from the value trained with: the checkpoint's hyperparameters, else its run's ``config.yaml``
    (the optimizer and scheduler; not checked for a checkpoint kept apart from its run). The same values pass:
    requeue scripts repeat their command line and config."""
    cls = pydoc.locate(str(_plain(model).get("class_path") or DEFAULT_MODULE))
    run = run_of(path)
    run_config = yaml.safe_load((run / "config.yaml").read_text()) if run and (run / "config.yaml").is_file() else {}
    trained_args = {**_init_args((run_config or {}).get("model") or {}), **checkpoint["hyper_parameters"]}
    given_args = _init_args(model)
    for option in [o for o in getattr(cls, "restored_by_checkpoint", ()) if o in trained_args]:
        difference = _first_difference(_json(given_args.get(option)), _json(trained_args.get(option)), f"model.{option}")
        if difference is None:
            continue
        key, given, trained = difference
        flag = _flag(argv, option)
        fix = f"drop {flag}" if flag else "give the run's own config (its config.yaml)"
        raise UserInputError(
            f"{key}: {path} was trained with {trained!r}, and a resumed fit continues with what the checkpoint "
            f"restores (model.{option}: its state, not only its settings), so {given!r} from the "
            f"{'command line' if flag else 'config'} cannot take effect: {fix}, or export the model and start a new "
            "run from it"
        )


def _flag(argv: list[str], key: str) -> str | None:
    """The command line's flag that gives ``model.<key>`` or one of its fields, as typed (``--model.loss``,
    ``--model.init_args.optimizer.init_args.lr``); ``None`` where only a config file gives it."""
    for arg in argv:
        flag = arg.partition("=")[0]
        if not flag.startswith("--"):  # a value, e.g. a config file named model.loss.yaml
            continue
        plain = flag.removeprefix("--").replace(".init_args", "")
        if plain == f"model.{key}" or plain.startswith(f"model.{key}."):
            return flag
    return None


def _json(value: Any) -> Any:
    """``value`` as JSON would hold it (tuples as lists), for comparing a parsed config with a saved one."""
    return json.loads(json.dumps(_plain(value), default=str))


def _first_difference(given: Any, trained: Any, key: str) -> tuple[str, Any, Any] | None:
    """The first key (dotted, ``init_args`` left out) at which two config values differ, and the two values there."""
    if isinstance(given, dict) and isinstance(trained, dict):
        for name in [*given, *(k for k in trained if k not in given)]:
            sub = key if name == "init_args" else f"{key}.{name}"
            found = _first_difference(given.get(name), trained.get(name), sub)
            if found is not None:
                return found
        return None
    return None if given == trained else (key, given, trained)


def _plain(value: Any) -> Any:
    """Namespaces as dicts, for comparing a config value with a checkpoint's hyperparameter."""
    return value.as_dict() if isinstance(value, Namespace) else value


def _describe(value: Any) -> str:
    value = _plain(value)
    if isinstance(value, dict) and "class_path" in value:
        args = ", ".join(f"{k}={v!r}" for k, v in (value.get("init_args") or {}).items())
        return f"{value['class_path'].rsplit('.', 1)[-1]}({args})"
    return repr(value)
