"""``lightning-pref``: the command line, one subcommand per entry of :data:`COMMANDS`.

Lightning's ``fit``, ``validate``, ``test``, ``predict`` and our ``evaluate`` run through LightningCLI
(:mod:`lightning_pref.trainer_cli`); ``losses`` and ``judges`` list the registries; ``export`` and ``report`` are
functions whose signatures jsonargparse turns into options. Each subcommand imports only what it uses: the
training stack (Lightning, transformers, datasets: seconds of start-up) is imported by the training subcommands
alone, so the listings, ``report`` and ``--help`` answer at once.
"""

from __future__ import annotations

import atexit
import inspect
import os
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from jsonargparse import ArgumentParser
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lightning_pref.errors import TrainingError, UserInputError
from lightning_pref.registry import ADVANTAGES, JUDGES, LOSSES, REWARD_LOSSES, Registry, UnknownPluginError
from lightning_pref.report import write_report


def train(args: list[str] | None) -> bool:
    """A training subcommand, by LightningCLI; ``args`` is the whole command line (``None``: ``sys.argv``).
    Returns whether this process took part in a distributed run."""
    from lightning_pref.trainer_cli import run  # imported on use: the training stack's seconds of start-up

    return run(args)


def parse(fn: Callable[..., Any], name: str, argv: list[str], positional: bool = False) -> dict[str, Any]:
    """``fn``'s arguments parsed from ``argv``: jsonargparse makes the options (and ``--help``) from its
    signature and docstring."""
    parser = ArgumentParser(prog=f"lightning-pref {name}", description=fn.__doc__)
    parser.add_function_arguments(fn, as_positional=positional)
    return parser.parse_args(argv).as_dict()


#: Where a registry's names are used, in the title of its listing.
USED_BY = {LOSSES: "--model.loss of PreferenceModule and OnPolicyModule",
           REWARD_LOSSES: "--model.loss of RewardModule",
           ADVANTAGES: "--model.estimator of PolicyGradientModule",
           JUDGES: "evaluate --judge, --model.judge of OnPolicyModule and PolicyGradientModule"}
#: A plugin class's flags and what they say it needs, for the listings.
NEEDS = {"requires_reference": "reference", "paired": "pairs", "requires_kl_baseline": "KL baseline",
         "requires_critic": "critic", "requires_groups": "k >= 2"}


def print_registry(registry: Registry) -> None:
    """A table of a registry's plugins: name, class and paper (or summary), needs, parameters with defaults.

    Narrow enough for an 80-column terminal: the paper goes under the class, one parameter per line.
    """
    table = Table(title=f"{registry.plural} ({USED_BY.get(registry, registry.kind)})", box=box.SIMPLE_HEAD,
                  title_justify="left", pad_edge=False)
    rows = []
    for name in registry.names():
        cls = registry.get(name)
        about = getattr(cls, "paper", "") or (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
        about = re.sub(r"(:\w+:)?``?([^`]+)``?", r"\2", about)  # docstring markup as plain text
        params = [p for p in inspect.signature(cls.__init__).parameters.values()
                  if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        rows.append((
            name,
            f"{cls.__name__}\n[dim]{escape(about)}[/dim]" if about else cls.__name__,
            "\n".join(word for flag, word in NEEDS.items() if getattr(cls, flag, False)),
            "\n".join(escape(p.name if p.default is p.empty else f"{p.name}={p.default!r}") for p in params),
        ))
    needs = any(row[2] for row in rows)  # reward losses and judges declare no needs
    table.add_column("name", no_wrap=True)
    table.add_column("class", ratio=1)
    if needs:
        table.add_column("needs")
    table.add_column("parameters")
    for row in rows:
        table.add_row(*(row if needs else row[:2] + row[3:]))
    Console().print(table)


def print_losses() -> None:
    """The registered losses: preference losses, reward-model losses, then the advantage estimators of
    reinforcement learning (name, class, paper, what each needs, parameters with defaults)."""
    print_registry(LOSSES)
    print_registry(REWARD_LOSSES)
    print_registry(ADVANTAGES)


def print_judges() -> None:
    """The registered judges (name, class, what it does, parameters with defaults)."""
    print_registry(JUDGES)


def losses(argv: list[str]) -> None:
    """``lightning-pref losses``."""
    print_losses(**parse(print_losses, "losses", argv))


def judges(argv: list[str]) -> None:
    """``lightning-pref judges``."""
    print_judges(**parse(print_judges, "judges", argv))


def export(argv: list[str]) -> None:
    """``lightning-pref export``: a checkpoint's model as a Hugging Face model directory."""
    from lightning_pref.export import export_checkpoint  # imported on use: torch, transformers and Lightning

    out = export_checkpoint(**parse(export_checkpoint, "export", argv))
    if not (out / "config.json").is_file():  # adapter_only: peft's files, for the base model named in them
        how = "peft's AutoPeftModelForCausalLM.from_pretrained, which loads its base model too"
    elif "ForSequenceClassification" in (out / "config.json").read_text():
        how = "AutoModelForSequenceClassification.from_pretrained"
    else:
        how = "AutoModelForCausalLM.from_pretrained"
    Console(highlight=False).print(f"exported to {out} (load it with {how})", soft_wrap=True)


def report(argv: list[str]) -> None:
    """``lightning-pref report``: plots and an HTML page of a run."""
    given = parse(write_report, "report", argv, positional=True)
    written = write_report(**given)
    console = Console(highlight=False)
    if written.run_dir != Path(given["run_dir"]):
        console.print(f"newest training run under {given['run_dir']}: {written.run_dir}", markup=False, soft_wrap=True)
    for earlier, step in written.resumed:
        console.print(f"resumed from {earlier}: its metrics up to step {step - 1} come first", markup=False,
                      soft_wrap=True)
    console.print(f"wrote {written.html} and {len(written.plots) + bool(written.overview)} PNGs beside it",
                  markup=False, soft_wrap=True)


class Command(NamedTuple):
    """A subcommand: its line in ``--help``, and what runs it with the arguments after its name (``None``:
    LightningCLI, :func:`train`)."""

    help: str
    run: Callable[[list[str]], Any] | None = None


#: Every subcommand, in ``--help``'s order.
COMMANDS = {
    "fit": Command("train a module (policy, reward or on-policy model)"),
    "validate": Command("validation metrics of a model or checkpoint"),
    "test": Command("test metrics of a model or checkpoint"),
    "predict": Command("policy and reference completions to predictions.jsonl"),
    "evaluate": Command("judge policy vs reference completions: win rate"),
    "losses": Command("list the registered losses and their parameters", losses),
    "judges": Command("list the registered judges and their parameters", judges),
    "export": Command("a checkpoint as a Hugging Face model directory", export),
    "report": Command("plots and an HTML page of a run's metrics", report),
}


def command_parser() -> ArgumentParser:
    """The top-level parser: ``--help`` lists the subcommands; each parses its own arguments when it runs."""
    parser = ArgumentParser(prog="lightning-pref", description="Preference optimization of Hugging Face causal "
                            "LMs on PyTorch Lightning. Run a subcommand with --help for its options.")
    subcommands = parser.add_subcommands(dest="subcommand")
    for name, command in COMMANDS.items():
        subcommands.add_subcommand(name, ArgumentParser(), help=command.help)
    return parser


def main(args: list[str] | None = None) -> bool:
    """Run a ``lightning-pref`` subcommand; ``args`` replaces ``sys.argv[1:]`` (for scripts). A refused input is
    one line on stderr and ``SystemExit(2)``.

    Returns:
        Whether this process took part in a distributed run.
    """
    argv = list(sys.argv[1:] if args is None else args)
    name = argv[0] if argv else ""
    try:
        if name in COMMANDS and COMMANDS[name].run is not None:
            COMMANDS[name].run(argv[1:])
        elif name in COMMANDS or (name.startswith("-") and name not in ("-h", "--help")):
            return train(args)  # the training subcommands, or LightningCLI's options before one (-c CONFIG fit)
        else:
            command_parser().parse_args(argv)  # --help, or an error naming the subcommands
    except (UserInputError, TrainingError, UnknownPluginError) as err:
        # escaped: a message's own brackets (e.g. "lightning-pref[report]") are text, not rich markup
        Console(stderr=True, highlight=False).print(f"[bold red]error:[/bold red] {escape(str(err))}", soft_wrap=True)
        sys.exit(2)
    return False


def console() -> None:
    """The ``lightning-pref`` command (and ``python -m lightning_pref``, which multi-process launchers re-run):
    :func:`main` on ``sys.argv``.

    After a distributed run the process ends without finalizing the interpreter, once its threads are joined, its
    exit handlers run and its output flushed. Gloo's worker threads outlive the process group (other objects hold
    it) and release a collective's tensors after the collective has returned; one that does so while the interpreter
    is being finalized cannot take the GIL, and the process aborts with exit 134 ("terminate called without an
    active exception") after a run that finished: about one 2-process FSDP2 run in 20 on a 2-core CPU
    (pytorch/pytorch#190489).
    """
    if not main():
        return
    for thread in threading.enumerate():  # as interpreter exit does first: non-daemon threads finish
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # loggers' exit handlers (e.g. an experiment tracker's upload) still run
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


__all__ = ["COMMANDS", "console", "main"]
