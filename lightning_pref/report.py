"""``lightning-pref report RUN_DIR``: plots and a self-contained HTML page of a training run.

Reads the run's ``metrics.csv`` (Lightning's CSVLogger: ``train/*`` per logged step, ``val/*`` per validation),
``config.yaml`` and, when the ``SampleCompletions`` callback wrote one, ``completions.jsonl``. Writes one PNG per
plot (``report_<plot>.png``), an overview grid (``report_overview.png``) and ``report.html``, whose images are
embedded as data URIs so the page is a single file that can be mailed or attached. Only files this command wrote
are ever replaced; ``metrics.csv``, the config and the checkpoints are only read.
"""

from __future__ import annotations

import base64
import codecs
import csv
import html
import io
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from lightning_pref.checks import check_output_path
from lightning_pref.errors import UserInputError

#: Written into every PNG (as its ``Software`` text chunk) and into report.html, to recognize our own files.
GENERATOR = "lightning-pref report"
_RUN_META = "lightning-pref-run"  # report.html says which run it is of: another run's report is never replaced
OVERVIEW = "report_overview.png"
#: What each command run with a logger records in its log directory (:class:`lightning_pref.runs.RunRecord`):
#: which command it was, and for a resumed ``fit`` the checkpoint and step it resumed from.
RUN_RECORD = "run.yaml"
INSTALL_HINT = "pip install 'lightning-pref[report]'"
_RUN_FORMS = "give a run directory (lightning_logs/version_N) or the root directory that contains lightning_logs/"


class Plot(NamedTuple):
    """One figure, ``report_<name>.png``: the metric suffixes it draws, each under every stage prefix present."""

    name: str
    title: str
    suffixes: tuple[str, ...]
    overview: bool = False  # also a panel of report_overview.png
    ylim: tuple[float, float] | None = None  # for bounded quantities; None: fit the data
    separate: bool = False  # one axis per suffix: metrics whose units are not known to agree

    def panels(self) -> list[Plot]:
        """The axes this figure draws: the plot itself, or with ``separate`` one per suffix, titled by it, so
        that a score, a KL in nats and an entropy never share a y axis."""
        if not self.separate or len(self.suffixes) == 1:
            return [self]
        return [self._replace(title=suffix, suffixes=(suffix,), separate=False) for suffix in self.suffixes]

    @property
    def file_name(self) -> str:
        return f"report_{self.name}.png"  # never OVERVIEW: no row is named "overview", families are "metric_*"


#: Designed plots, in page order. Metrics logged under a stage prefix that no row claims are not dropped: each
#: family (``judge/score`` → ``judge``) gets a plot ``report_metric_<family>.png`` of its own, so new metrics are
#: plotted without code changes.
PLOTS = (
    Plot("loss", "Loss", ("loss",), overview=True),
    Plot("accuracy", "Reward accuracy", ("rewards/accuracies",), overview=True, ylim=(-0.03, 1.03)),
    Plot("margins", "Reward margin (chosen − rejected)", ("rewards/margins",), overview=True),
    Plot("rewards", "Implicit rewards", ("rewards/chosen", "rewards/rejected")),
    Plot("logps", "Policy log-probs", ("logps/chosen", "logps/rejected")),
    Plot("kl", "KL baseline z₀", ("kl",), overview=True),
    Plot("throughput", "Real tokens per second", ("device/items_per_sec",)),
    Plot("mfu", "Model FLOPs utilization", ("device/mfu",), ylim=(-0.03, 1.03)),
    Plot("padding", "Padding fraction of the cells the model runs", ("padding_fraction",), ylim=(-0.03, 1.03)),
)
#: Titles of a reward model's run, whose ``rewards/*`` are its scores.
REWARD_MODEL_TITLES = {"rewards": "Reward-model scores"}
#: What Lightning's ThroughputMonitor logs besides the rates plotted above: running totals and rates in other
#: units (the same curve rescaled), not plotted.
UNPLOTTED = frozenset({
    "batches", "samples", "lengths", "time", "flops", "items_per_sec", "mfu",
    *(f"{prefix}{rate}_per_sec" for prefix in ("", "device/") for rate in ("batches", "samples", "flops")),
})

#: Stage prefix → matplotlib line style. Training is logged every few steps (a line); validation is sparse, so
#: its points are marked.
STAGE_STYLES: dict[str, dict[str, Any]] = {
    "train": {"linewidth": 1.3},
    "val": {"linestyle": "--", "linewidth": 1.0, "marker": "o", "markersize": 5, "markerfacecolor": "white",
            "markeredgewidth": 1.5},
}

Series = dict[str, list[tuple[int, float]]]  # column → (step, value) of the rows where it was logged


class Completion(NamedTuple):
    """One sampled prompt's completions (a line of ``completions.jsonl``)."""

    prompt: str
    policy: str
    reference: str | None


@dataclass
class Report:
    """What :func:`write_report` wrote."""

    run_dir: Path
    html: Path
    plots: list[Path]
    overview: Path | None
    resumed: list[tuple[Path, int]] = field(default_factory=list)  # see read_history


def resolve_run_dir(path: Path) -> Path:
    """The run directory itself, or the newest training run (``version_N`` written by ``fit``, with a
    ``metrics.csv``) under a root or lightning_logs/: a ``validate`` or ``predict`` of a model that is not a
    training run's checkpoint also gets a ``version_N`` of its own, and is not what ``report ROOT`` means."""
    if not path.exists():
        raise UserInputError(f"{path}: no such directory; {_RUN_FORMS}")
    if not path.is_dir():
        raise UserInputError(f"{path}: not a directory; {_RUN_FORMS}")
    if (path / "metrics.csv").is_file():
        return path
    versions = [
        p.parent
        for pattern in ("lightning_logs/version_*/metrics.csv", "version_*/metrics.csv")
        for p in path.glob(pattern)
        if p.parent.name.removeprefix("version_").isdigit()
    ]
    if not versions:
        raise UserInputError(f"{path}: no metrics.csv here or in lightning_logs/version_*/; {_RUN_FORMS}")
    runs = [v for v in versions if is_training_run(v)]
    if not runs:
        raise UserInputError(f"{path}: no training run among {', '.join(sorted(v.name for v in versions))} (only "
                             "validate/test/predict runs); give one of them as the run directory to report on it")
    # Lightning numbers each new run one above the highest existing version, so the highest is the newest.
    return max(runs, key=lambda p: int(p.name.removeprefix("version_")))


def read_run_record(run: Path) -> dict[str, Any]:
    """The run's :data:`RUN_RECORD` (empty for a run written before there was one, or by another tool)."""
    path = run / RUN_RECORD
    if not path.is_file():
        return {}
    try:
        record = yaml.safe_load(read_text(path))
    except yaml.YAMLError as err:
        raise UserInputError(f"{path}: not valid YAML ({type(err).__name__}); delete it to report the run "
                             "without it") from None
    return record if isinstance(record, dict) else {}


def is_training_run(run: Path) -> bool:
    """Whether ``fit`` wrote this run directory: as its :data:`RUN_RECORD` says, or, for a run from before there
    was one, whether it has checkpoints or logged training metrics (``train/`` columns of its ``metrics.csv``)."""
    command = read_run_record(run).get("command")
    if command is not None:
        return command == "fit"
    if (run / "checkpoints").is_dir():
        return True
    metrics = run / "metrics.csv"
    return metrics.is_file() and "train/" in read_text(metrics).split("\n", 1)[0]


def read_text(path: Path) -> str:
    """A text file as written by Lightning (UTF-8) or re-saved by a spreadsheet: UTF-8 with a byte-order mark, or
    UTF-16 with one ("Unicode text"). Anything else is one line naming the file."""
    raw = path.read_bytes()
    boms = {codecs.BOM_UTF8: "utf-8-sig", codecs.BOM_UTF16_LE: "utf-16", codecs.BOM_UTF16_BE: "utf-16"}
    encoding = next((name for bom, name in boms.items() if raw.startswith(bom)), "utf-8")
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as err:
        raise UserInputError(f"{path}: not {encoding.upper()} text (byte {err.start}); save it as UTF-8 (or UTF-16 "
                             "with a byte-order mark)") from None


def read_metrics(path: Path) -> Series:
    """Every non-empty cell of a CSVLogger ``metrics.csv``, by column (``step`` and ``epoch`` excluded).

    The file may also have been opened and saved by a spreadsheet: in UTF-16 (:func:`read_text`), with tabs or
    semicolons between cells, and steps written as ``5.0``.
    """
    text = read_text(path)
    header = text.split("\n", 1)[0]
    delimiter = max(",\t;", key=header.count)  # the separator the header line uses most
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    if "step" not in (reader.fieldnames or []):
        raise UserInputError(f"{path}: no 'step' column; expected the metrics.csv of Lightning's CSVLogger")
    series: Series = {c: [] for c in reader.fieldnames if c not in ("step", "epoch")}
    for row in reader:
        try:
            step = float(row["step"])
            if not step.is_integer():
                raise ValueError(step)
            for column, points in series.items():
                if row[column]:
                    points.append((int(step), float(row[column])))
        except (TypeError, ValueError):
            # TypeError: a short row leaves None cells
            raise UserInputError(
                f"{path}:{reader.line_num}: not a number in this row; metrics.csv must hold only numbers"
            ) from None
    series = {column: points for column, points in series.items() if points}
    if not any(column.partition("/")[0] in STAGE_STYLES for column in series):
        stages = "/, ".join(STAGE_STYLES)
        raise UserInputError(f"{path}: no values under {stages}/ yet; nothing to report until the run logs some")
    return series


def read_history(run: Path) -> tuple[Series, list[tuple[Path, int]]]:
    """The run's metrics, preceded by those of the run it resumed from, up to the step it resumed at.

    A resumed ``fit`` logs into a new ``version_N`` from the checkpoint's step on; its :data:`RUN_RECORD` names
    the checkpoint (``<earlier run>/checkpoints/x.ckpt``) and the step. That run may itself be a resumption:
    the chain is followed back to the first run. A run it names that is gone (moved, deleted) ends the chain.

    Returns:
        The stitched series, and ``(earlier run, step it was resumed at)`` for each earlier run, oldest first.
    """
    series = read_metrics(run / "metrics.csv")
    earlier: list[tuple[Path, int]] = []
    seen = {run.resolve()}
    record = read_run_record(run)
    while record.get("resumed_from") and isinstance(record.get("resumed_at_step"), int):
        checkpoint = Path(record["resumed_from"])
        previous, step = checkpoint.parent.parent, record["resumed_at_step"]
        if checkpoint.parent.name != "checkpoints" or previous.resolve() in seen \
                or not (previous / "metrics.csv").is_file():
            break
        seen.add(previous.resolve())
        before = read_metrics(previous / "metrics.csv")
        # metrics.csv labels a step by its index from 0: the checkpoint after `step` steps holds steps 0..step-1
        series = {c: [(s, v) for s, v in before.get(c, []) if s < step] + series.get(c, [])
                  for c in [*before, *(c for c in series if c not in before)]}
        earlier.insert(0, (previous, step))
        record = read_run_record(previous)
    return {c: points for c, points in series.items() if points}, earlier


def plan_plots(columns: Iterable[str]) -> list[Plot]:
    """The plots for these columns: the rows of :data:`PLOTS` that have data, then one per unclaimed family."""
    present = {c.partition("/")[2] for c in columns if c.partition("/")[0] in STAGE_STYLES and "/" in c}
    plots = [p._replace(suffixes=tuple(s for s in p.suffixes if s in present)) for p in PLOTS]
    plots = [p for p in plots if p.suffixes]
    claimed = {s for p in PLOTS for s in p.suffixes} | UNPLOTTED
    families: dict[str, list[str]] = {}
    for suffix in sorted(present - claimed):
        families.setdefault(suffix.rpartition("/")[0] or suffix, []).append(suffix)
    names = {p.name for p in PLOTS}
    for family, members in families.items():
        title = ", ".join(members) if len(members) <= 3 else f"{family}/* ({len(members)} metrics)"
        stem = name = "metric_" + re.sub(r"[^A-Za-z0-9]+", "_", family).strip("_")
        n = 2
        while name in names:  # families that differ only in punctuation ("judge-x", "judge_x")
            name, n = f"{stem}_{n}", n + 1
        names.add(name)
        plots.append(Plot(name, title, tuple(members), separate=True))  # a family's units may differ
    return plots


def final_validation(series: Series) -> list[tuple[str, float, int]]:
    """``(column, value, step)`` of the last logged value of each ``val/`` column."""
    return [(c, points[-1][1], points[-1][0]) for c, points in series.items() if c.startswith("val/")]


#: The options a run's summary shows: what was trained, and the plugins it was trained with.
CONFIG_MODELS = ("policy", "backbone")
CONFIG_PLUGINS = ("loss", "judge", "estimator")
#: What else tells two runs apart, as ``section.key`` paths of ``config.yaml`` (shown where set).
CONFIG_SETTINGS = ("trainer.max_steps", "trainer.max_epochs", "data.batch_size", "trainer.accumulate_grad_batches",
                   "data.train", "data.max_length", "trainer.precision", "seed_everything")
#: What an unset setting means (a run's precision matters even where the config left Lightning's default).
CONFIG_DEFAULTS = {"trainer.precision": "32-true (Lightning's default)"}


def read_config(path: Path) -> list[tuple[str, str]]:
    """The config summary rows of a run's ``config.yaml``: the module (unless the default policy module), the
    model (``model.policy`` or, for a reward model, ``model.backbone``) and the plugins (loss, judge, advantage
    estimator) with their init_args. The module may be written flat (``model: {policy: ...}``) or as a class
    (``model: {class_path: lightning_pref.RewardModule, init_args: {...}}``), as every module but the default is."""
    try:
        config = yaml.safe_load(read_text(path))
    except yaml.YAMLError as err:
        raise UserInputError(f"{path}: not valid YAML ({type(err).__name__}); rerun fit to rewrite it") from None
    model = config.get("model") if isinstance(config, dict) else None
    model = model if isinstance(model, dict) else {}
    rows = []
    if isinstance(model.get("class_path"), str):
        rows.append(("model", model["class_path"].rsplit(".", 1)[-1]))
        model = model.get("init_args") if isinstance(model.get("init_args"), dict) else {}
    rows += [(f"model.{key}", _compact(model[key])) for key in CONFIG_MODELS if key in model]
    for key in CONFIG_PLUGINS:
        plugin = model.get(key)
        if isinstance(plugin, dict) and "class_path" in plugin:
            rows.append((f"model.{key}", _compact(plugin["class_path"])))
            rows += [(f"model.{key}.{k}", _compact(v)) for k, v in (plugin.get("init_args") or {}).items()]
        elif plugin is not None:
            rows.append((f"model.{key}", _compact(plugin)))
    optimizer = model.get("optimizer")
    if isinstance(optimizer, dict) and "class_path" in optimizer:  # the learning rate, with what it is for
        lr = (optimizer.get("init_args") or {}).get("lr")
        shown = f", lr {lr:g}" if isinstance(lr, int | float) else ""
        rows.append(("model.optimizer", _compact(optimizer["class_path"]) + shown))
    if not rows:  # a config.yaml, but not one of a lightning-pref run: say so rather than "no config.yaml"
        rows.append(("model", "(no model options in config.yaml)"))
    for setting in CONFIG_SETTINGS:
        value: Any = config
        for part in setting.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None and setting in CONFIG_DEFAULTS:
            rows.append((setting, CONFIG_DEFAULTS[setting]))
        elif value is not None and value != -1:  # -1: Lightning's "no limit"
            rows.append((setting, _compact(value)))
    return rows


def _compact(value: Any) -> str:
    """One line: strings as they are, mappings and lists in YAML flow style, other scalars as YAML writes them."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list):
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).strip()
    return json.dumps(value)  # the YAML spelling of numbers, booleans and null, without a document end marker


def read_completions(path: Path) -> dict[int, list[Completion]]:
    """The ``SampleCompletions`` records of ``completions.jsonl``, grouped by step in step order."""
    by_step: dict[int, list[Completion]] = {}
    schema = '{"step": int, "epoch": int, "prompt": str, "policy": str, "reference": str | null}'
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserInputError(f"{path}:{number}: invalid JSON ({err.msg}); each line must be {schema}") from None
            valid = (
                isinstance(record, dict)
                and isinstance(record.get("step"), int)
                and isinstance(record.get("prompt"), str)
                and isinstance(record.get("policy"), str)
                and isinstance(record.get("reference"), str | None)
            )
            if not valid:
                raise UserInputError(f"{path}:{number}: expected an object {schema}")
            by_step.setdefault(record["step"], []).append(
                Completion(record["prompt"], record["policy"], record.get("reference"))
            )
    return dict(sorted(by_step.items()))


def _figure_class() -> type:
    try:
        # Figure objects outside pyplot render with the Agg canvas: headless, and the process-wide backend
        # (e.g. a notebook's) is left alone.
        from matplotlib.figure import Figure
    except ImportError:
        raise UserInputError(f"report: matplotlib is not installed; {INSTALL_HINT}") from None
    return Figure


def _draw(ax: Any, plot: Plot, series: Series) -> None:
    values = []
    for i, suffix in enumerate(plot.suffixes):
        for stage, style in STAGE_STYLES.items():
            points = series.get(f"{stage}/{suffix}")
            if not points:
                continue
            steps, ys = zip(*points, strict=True)
            values += ys
            # a lone training point would be an invisible line
            marker = {"marker": "."} if len(points) == 1 and "marker" not in style else {}
            ax.plot(steps, ys, color=f"C{i}", label=f"{stage}/{suffix}", **style, **marker)
    finite = [v for v in values if math.isfinite(v)]
    if plot.ylim is not None:
        ax.set_ylim(*plot.ylim)
    # Losses fall over orders of magnitude (DPO: 0.69 to 1e-4); a linear axis would flatten all but the start.
    elif finite and min(finite) > 0 and max(finite) / min(finite) >= 100:
        ax.set_yscale("log")
    ax.set_title(plot.title, fontsize=10)
    ax.set_xlabel("step", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": GENERATOR})
    return buffer.getvalue()


def render_plots(plots: list[Plot], series: Series) -> tuple[dict[str, bytes], bytes | None]:
    """PNG bytes of each plot, by file name, and of the overview grid (``None`` when no overview plot has data)."""
    figure = _figure_class()
    pngs: dict[str, bytes] = {}
    for plot in plots:
        panels = plot.panels()
        columns = min(len(panels), 3)
        rows = -(-len(panels) // columns)
        fig = figure(figsize=(5.2 if columns == 1 else 3.9 * columns, 3.3 * rows), layout="constrained")
        for ax, panel in zip(fig.subplots(rows, columns, squeeze=False).flat, panels, strict=False):
            _draw(ax, panel, series)
        for ax in fig.axes[len(panels):]:  # the last row's unused cells
            ax.set_visible(False)
        if len(panels) > 1:
            fig.suptitle(plot.title, fontsize=10)
        pngs[plot.file_name] = _png(fig)
    panels = [p for p in plots if p.overview]
    if not panels:
        return pngs, None
    fig = figure(figsize=(3.9 * len(panels), 3.0), layout="constrained")
    for ax, plot in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        _draw(ax, plot, series)
    return pngs, _png(fig)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; } th, td { border: 1px solid #ccc; padding: 0.3em 0.6em;
  text-align: left; vertical-align: top; } th { background: #f4f4f4; } td.num { text-align: right; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; } figure { margin: 0; } img { max-width: 100%; }
table.completions td { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 0.85em;
  max-width: 30em; } .muted { color: #888; }
"""


def _table(headers: tuple[str, ...], rows: list[tuple[str, ...]], css_class: str = "", numeric: int = -1) -> str:
    """An HTML table of already-escaped cells; columns from index ``numeric`` on are right-aligned."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if 0 <= numeric <= i else f"<td>{c}</td>"
                         for i, c in enumerate(row)) + "</tr>\n"
        for row in rows
    )
    attributes = f' class="{css_class}"' if css_class else ""
    return f"<table{attributes}><tr>{head}</tr>\n{body}</table>"


def render_html(
    run_dir: Path,
    series: Series,
    pngs: dict[str, bytes],
    plots: list[Plot],
    config: list[tuple[str, str]] | None,
    completions: dict[int, list[Completion]] | None,
    resumed: list[tuple[Path, int]] = (),
) -> str:
    """The report page; every text from the run's files is HTML-escaped, every image is a data URI."""
    e = html.escape
    parts = [f"<h1>lightning-pref report</h1>\n<p><code>{e(str(run_dir))}</code></p>"]
    if resumed:
        chain = ", then ".join(f"<code>{e(str(p))}</code> up to step {step - 1}" for p, step in resumed)
        parts.append(f'<p class="muted">Resumed: the metrics of {chain}, then this run\'s.</p>')
    parts.append("<h2>Configuration</h2>")
    if config:
        parts.append(_table(("key", "value"), [(e(k), f"<code>{e(v)}</code>") for k, v in config]))
    else:
        parts.append('<p class="muted">No config.yaml in the run directory.</p>')
    parts.append("<h2>Final validation metrics</h2>")
    final = final_validation(series)
    if final:
        rows = [(e(column), f"{value:.6g}", str(step)) for column, value, step in final]
        parts.append(_table(("metric", "value", "step"), rows, "final-val", numeric=1))
    else:
        parts.append('<p class="muted">No validation metrics were logged.</p>')
    parts.append('<h2>Metrics</h2>\n<div class="plots">')
    for plot in plots:
        data = base64.b64encode(pngs[plot.file_name]).decode("ascii")
        parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{e(plot.title)}" '
                     f'title="{e(plot.file_name)}"></figure>')
    parts.append("</div>\n<h2>Sampled completions</h2>")
    if completions:
        for step, records in completions.items():
            rows = [(e(c.prompt), e(c.policy), '<span class="muted">—</span>' if c.reference is None
                     else e(c.reference)) for c in records]
            parts.append(f"<h3>Step {step}</h3>")
            parts.append(_table(("prompt", "policy", "reference"), rows, "completions"))
    else:
        parts.append('<p class="muted">No completions.jsonl in the run directory (the SampleCompletions callback '
                     "writes one).</p>")
    body = "\n".join(parts)
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="generator" content="{GENERATOR}">\n'
        f'<meta name="{_RUN_META}" content="{e(str(run_dir.resolve()))}">\n'
        f'<title>report: {e(run_dir.name)}</title>\n'
        f"<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def _reported_run(page: Path) -> str | None:
    """The run an earlier ``report.html`` was written for (``None``: no such page, or one from before it said)."""
    if not page.is_file():
        return None
    text = page.read_text(encoding="utf-8", errors="replace")
    found = re.search(rf'<meta name="{_RUN_META}" content="([^"]*)">', text)
    return html.unescape(found.group(1)) if found else None


def _check_replaceable(path: Path) -> None:
    """Refuse to replace a file that an earlier report did not write (it carries :data:`GENERATOR`)."""
    if path.exists() and (not path.is_file() or GENERATOR.encode() not in path.read_bytes()):
        raise UserInputError(
            f"{path}: exists and was not written by lightning-pref report; move it or pass another --output_dir"
        )


def write_report(run_dir: str, output_dir: str | None = None) -> Report:
    """Write plots and a self-contained report.html of a training run.

    Args:
        run_dir: a run directory (``.../lightning_logs/version_N``, with metrics.csv), or a root directory that
            contains ``lightning_logs/`` (its newest version is used).
        output_dir: where to write the report files; default: the run directory. Earlier report files there are
            replaced; other files are never touched.
    """
    run = resolve_run_dir(Path(run_dir))
    out = check_output_path("--output_dir", output_dir, "directory") if output_dir is not None else run
    series, resumed = read_history(run)
    config = read_config(run / "config.yaml") if (run / "config.yaml").is_file() else None
    plots = plan_plots(series)
    if ("model", "RewardModule") in (config or []):  # its rewards are the model's scores, not DPO's implicit ones
        plots = [p._replace(title=REWARD_MODEL_TITLES.get(p.name, p.title)) for p in plots]
    completions = read_completions(run / "completions.jsonl") if (run / "completions.jsonl").is_file() else None
    pngs, overview = render_plots(plots, series)
    page = render_html(run, series, pngs, plots, config, completions, resumed)

    files = {**pngs, **({OVERVIEW: overview} if overview else {}), "report.html": page.encode()}
    other = _reported_run(out / "report.html")
    if other is not None and other != str(run.resolve()):  # its plots would be mixed with this run's
        raise UserInputError(f"--output_dir: {out} holds the report of another run ({other}); choose another "
                             "directory (a run's report goes beside it by default)")
    for name in files:  # all checked before anything is written
        _check_replaceable(out / name)
    out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (out / name).write_bytes(content)
    for stale in set(out.glob("report_*.png")) - {out / name for name in files}:  # this run's plots it no longer has
        if GENERATOR.encode() in stale.read_bytes():
            stale.unlink()
    return Report(run, out / "report.html", [out / n for n in pngs], out / OVERVIEW if overview else None, resumed)

