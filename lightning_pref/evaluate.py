"""``lightning-pref evaluate``: what alignment did to the policy's *behaviour*, judged on its generations.

For held-out prompts (``data.predict``, default: the validation prompts) the policy and the reference each
generate (``model.generation``), a judge compares every pair, and the report gives the policy's win rate over the
reference with ties counted apart, each side's mean judge score, mean completion length and EOS rate, each with a
confidence interval. It is written as JSON next to the checkpoint (``<checkpoint>.evaluation.json``, never over
an earlier one) and printed as a table; the completions themselves are in the run's ``predictions.jsonl``.

``evaluate`` is a method of :class:`PreferenceTrainer`, so the CLI gets it as a subcommand the way it gets
``fit`` or ``predict``, with every ``--trainer.*``, ``--model.*`` and ``--data.*`` option.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from rich.console import Console
from rich.table import Table

from lightning_pref.checks import check_output_path
from lightning_pref.errors import UserInputError
from lightning_pref.judges.base import Judge, judge_preferences, judge_scores
from lightning_pref.predict import PredictionWriter


def wilson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (sound near 0 and 1, unlike the normal approximation)."""
    if n == 0:
        return 0.0, 1.0
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, center - half), min(1.0, center + half)


def mean_interval(values: list[float], confidence: float = 0.95) -> dict[str, float | None]:
    """Mean and its normal-approximation interval (mean ± z·sd/√n); ``None`` for all three without values
    (JSON's null: a NaN would make the report invalid JSON)."""
    n = len(values)
    if not n:
        return {"mean": None, "low": None, "high": None}
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if n > 1 else 0.0
    half = statistics.NormalDist().inv_cdf(0.5 + confidence / 2) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half}


def _flat(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def evaluate_records(records: list[dict[str, Any]], judge: Judge, confidence: float = 0.95) -> dict[str, Any]:
    """Judge ``predictions.jsonl`` records (policy vs reference) and summarize.

    Every completion is paired with the reference's completion of the same prompt and sample index.

    Raises:
        UserInputError: a record without a reference completion (no reference model to compare against).
    """
    if any(r.get("reference") is None for r in records):
        raise UserInputError(
            "evaluate: the policy is compared with the reference's completions, but there is no reference model "
            "(model.reference_mode none); use reference_mode model, precomputed or adapter"
        )
    prompts, policy, reference = [], [], []
    for r in records:
        samples = _flat(r["policy"])
        prompts += [r["prompt"]] * len(samples)
        policy += samples
        reference += _flat(r["reference"])
    # The judge's output is checked where it enters: a value that is not a verdict (or a NaN score) is one line
    # naming the judge, not a comparison counted as neither win, loss nor tie, or a crash in statistics.
    verdicts = judge_preferences(judge, prompts, policy, reference)
    n = len(verdicts)
    counts = {"win": verdicts.count(1), "loss": verdicts.count(-1), "tie": verdicts.count(0)}
    report: dict[str, Any] = {"judge": type(judge).__name__, "prompts": len(records), "comparisons": n,
                              "confidence": confidence}
    for outcome, k in counts.items():
        low, high = wilson(k, n, confidence)
        report[f"{outcome}_rate"] = {"value": k / n if n else None, "low": low, "high": high, "count": k}
    decided = counts["win"] + counts["loss"]
    low, high = wilson(counts["win"], decided, confidence)
    # every comparison a tie: no win rate to give (null, not NaN)
    report["win_rate_without_ties"] = {"value": counts["win"] / decided if decided else None,
                                       "low": low, "high": high}
    for side, texts in (("policy", policy), ("reference", reference)):
        stats: dict[str, Any] = {}
        if judge.scores:
            stats["score"] = mean_interval(judge_scores(judge, prompts, texts), confidence)
        tokens = [t for r in records for t in _flat(r.get(f"{side}_tokens", []))]
        eos = [bool(e) for r in records for e in _flat(r.get(f"{side}_eos", []))]
        if tokens:
            stats["tokens"] = mean_interval([float(t) for t in tokens], confidence)
        if eos:
            low, high = wilson(sum(eos), len(eos), confidence)
            stats["eos_rate"] = {"value": sum(eos) / len(eos), "low": low, "high": high}
        report[side] = stats
    return report


def print_report(report: dict[str, Any], path: Path | None) -> None:
    """The report as two tables on stdout: the comparisons' outcomes, then each side's numbers."""
    pct = int(round(report["confidence"] * 100))

    def ci(entry: dict[str, float | None]) -> str:
        value = entry.get("value", entry.get("mean"))
        if value is None:
            return "– (none)"
        return f"{value:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"

    outcomes = Table(title=f"evaluate: policy vs reference ({report['judge']}, {report['comparisons']} comparisons, "
                     f"{pct}% intervals)", title_justify="left")
    for column in ("outcome", "rate", "count"):
        outcomes.add_column(column, justify="left" if column == "outcome" else "right")
    for outcome, label in (("win", "policy better (win)"), ("loss", "reference better (loss)"), ("tie", "tie")):
        outcomes.add_row(label, ci(report[f"{outcome}_rate"]), str(report[f"{outcome}_rate"]["count"]))
    outcomes.add_row("win rate without ties", ci(report["win_rate_without_ties"]), "")
    sides = Table(title_justify="left")
    for column in ("", "policy", "reference"):
        sides.add_column(column, justify="right" if column else "left")
    for key, label in (("score", "mean judge score"), ("tokens", "mean completion tokens"), ("eos_rate", "EOS rate")):
        if key in report["policy"]:
            sides.add_row(label, ci(report["policy"][key]), ci(report["reference"][key]))
    console = Console()
    console.print(outcomes)
    console.print(sides)
    if path is not None:
        console.print(f"written to {path}", highlight=False, soft_wrap=True)


def write_json(path: Path, report: dict[str, Any]) -> None:
    """``report`` as strict JSON (``allow_nan=False``: a NaN that slipped through is an error here, not an
    invalid file for whoever reads it), written under a temporary name and moved into place, so an interrupted
    run leaves no partial report."""
    text = json.dumps(report, indent=2, allow_nan=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _unique(path: Path) -> Path:
    """``path``, or ``path`` with ``-1``, ``-2``, ... before its suffixes when it exists: never over a file."""
    if not path.exists():
        return path
    stem, suffix = path.name.split(".", 1)
    return next(p for i in range(1, 10_000) if not (p := path.with_name(f"{stem}-{i}.{suffix}")).exists())


class PreferenceTrainer(Trainer):
    """Lightning's ``Trainer`` with one more entry point, :meth:`evaluate`."""

    def evaluate(
        self,
        model: LightningModule | None = None,
        datamodule: LightningDataModule | None = None,
        ckpt_path: str | None = None,
        judge: Judge | None = None,
        output: str | None = None,
        confidence: float = 0.95,
    ) -> dict[str, Any] | None:
        """Generate for held-out prompts with the policy and the reference, judge, and report the win rate.

        Args:
            model: the module (its policy and reference generate).
            datamodule: where the prompts come from (``data.predict``, default: the validation prompts).
            ckpt_path: the checkpoint to evaluate; ``None`` = the module as it is.
            judge: the judge (``lightning-pref evaluate --judge no_shouting``, or ``--judge function
                --judge.fn my_pkg.rules:score``; a registered name, class name or import path).
            output: the JSON file; ``None`` = ``<checkpoint>.evaluation.json`` beside the checkpoint (the run
                directory without one), with ``-1``, ``-2``, ... rather than over an earlier report.
            confidence: level of the intervals.

        Returns:
            The report on rank 0, ``None`` on other ranks.
        """
        if judge is None:
            raise UserInputError("--judge: required, e.g. --judge no_shouting or --judge function --judge.fn pkg.mod:fn")
        if not 0 < confidence < 1:
            raise UserInputError(f"--confidence: must be in (0, 1), got {confidence}")
        if output is not None and check_output_path("--output", output, "file").exists():
            raise UserInputError(f"--output: {output} exists; choose another path")
        writer = next((c for c in self.callbacks if isinstance(c, PredictionWriter)), None)
        if writer is None:
            writer = PredictionWriter()
            self.callbacks.append(writer)
        self.predict(model, datamodule=datamodule, ckpt_path=ckpt_path, return_predictions=False)
        log_dir = Path(self.log_dir or self.default_root_dir)  # a collective: every rank asks
        if not self.is_global_zero:
            return None
        report = evaluate_records(writer.records, judge, confidence)
        report["checkpoint"], report["predictions"] = ckpt_path, str(writer.written) if writer.written else None
        if output is not None:
            path = Path(output)
        elif ckpt_path is not None and Path(ckpt_path).is_file():
            path = _unique(Path(ckpt_path).with_suffix(".evaluation.json"))
        else:
            path = _unique(log_dir / "evaluation.json")
        write_json(path, report)
        print_report(report, path)
        return report
