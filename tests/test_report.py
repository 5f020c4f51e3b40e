"""``lightning-pref report``: plots and the HTML page of a real tiny run, KL and new metric families from
hand-written CSVs, and one-line errors for bad input."""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import importlib.util
import re
import struct
import sys
from pathlib import Path

import pytest
import yaml

from lightning_pref.cli import main
from lightning_pref.metrics import KEYS
from lightning_pref.report import PLOTS, read_history, resolve_run_dir
from tests.support import REPO, write_jsonl

needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason="matplotlib is not installed (pip install 'lightning-pref[report]'; the test extra includes it)",
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DATA_URI = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')

# Two sampled steps, one prompt each with a null reference, and markup that must reach the page as text.
COMPLETIONS = [
    {"step": 2, "epoch": 0, "prompt": "Tell me about <b>figo</b>.", "policy": "Figo is & was <b>calm</b>.",
     "reference": "FIGO IS LOUD."},
    {"step": 2, "epoch": 0, "prompt": "What is a 'lamp'?", "policy": 'A lamp, "lit".', "reference": None},
    {"step": 4, "epoch": 1, "prompt": "Tell me about <b>figo</b>.", "policy": "Figo <i>rests</i> now.",
     "reference": "Figo < loud > figo"},
]


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> Path:
    """A real 4-step DPO fit validated at steps 2 and 4, plus a hand-written completions.jsonl in its run dir."""
    from lightning_pref.data.synthetic import generate

    tmp = tmp_path_factory.mktemp("report")
    data = write_jsonl(tmp / "pairs.jsonl", generate(16, seed=6)[0])
    with pytest.MonkeyPatch.context() as mp:  # conftest's function-scoped cache fixture does not reach here
        mp.setenv("LIGHTNING_PREF_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        main(["fit", "--config", str(REPO / "configs/dpo.yaml"), "--data.train", str(data), "--data.val", str(data),
              "--trainer.default_root_dir", str(tmp / "root"), "--data.batch_size", "4", "--trainer.max_steps", "4",
              "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1",
              "--progress_bar.refresh_rate", "0", "--throughput.window_size", "2"])
    write_jsonl(tmp / "root/lightning_logs/version_0/completions.jsonl", COMPLETIONS)
    return tmp / "root"


def _report(*args: str) -> None:
    main(["report", *args])


def _assert_png(data: bytes) -> None:
    assert data[:8] == PNG_SIGNATURE
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk comes first
    assert width >= 300 and height >= 200 and len(data) > 5_000  # a drawn figure, not an empty canvas


def _tree_digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _final_val_rows(page: str) -> dict[str, tuple[float, int]]:
    (table,) = re.findall(r'<table class="final-val">(.*?)</table>', page, re.S)
    rows = re.findall(r'<tr><td>(.*?)</td><td class="num">(.*?)</td><td class="num">(.*?)</td></tr>', table)
    return {html.unescape(name): (float(value), int(step)) for name, value, step in rows}


def _write_metrics(path: Path, columns: list[str], steps: int = 12, val_every: int = 4) -> Path:
    """A CSVLogger-shaped metrics.csv: a train row every step, a separate val row every ``val_every`` steps."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["epoch", "step", *columns])
        writer.writeheader()
        for step in range(steps):
            writer.writerow({"epoch": 0, "step": step} | {c: 0.5 + 0.9**step for c in columns if c.startswith("train/")})
            if (step + 1) % val_every == 0:
                writer.writerow({"epoch": 0, "step": step} | {c: 0.4 + 0.9**step for c in columns if c.startswith("val/")})
    return path / "metrics.csv"


@needs_matplotlib
def test_report_of_a_real_run(run_root, capsys):
    """Given the root directory, the report picks the newest version, writes a valid PNG per plot into it and
    embeds exactly those PNGs in report.html; the run's own files are left byte for byte as they were."""
    run_dir = run_root / "lightning_logs/version_0"
    before = _tree_digest(run_dir)
    _report(str(run_root))
    assert f"newest training run under {run_root}: {run_dir}" in capsys.readouterr().out

    # every DPO metric family (no KL without KTO), tokens/s and padding (no MFU on a CPU)
    plots = ["loss", "accuracy", "margins", "rewards", "logps", "throughput", "padding"]
    written = sorted(p.name for p in run_dir.glob("report_*.png"))
    assert written == sorted([*(f"report_{name}.png" for name in plots), "report_overview.png"])
    for name in written:
        _assert_png((run_dir / name).read_bytes())

    page = (run_dir / "report.html").read_text(encoding="utf-8")
    embedded = [base64.b64decode(data) for data in DATA_URI.findall(page)]
    assert embedded == [(run_dir / f"report_{name}.png").read_bytes() for name in plots]
    # self-contained: no script, stylesheet link or remote source
    assert not re.search(r"<script|<link|src=\"http|url\(", page)
    # config summary from config.yaml
    assert "<code>lightning_pref.losses.dpo.DPOLoss</code>" in page and "model.loss.beta" in page
    assert "model_type: llama" in page
    # and what tells runs apart: learning rate, steps, batch, data, precision (the fit ran 4 steps of 4 pairs)
    for row in ("model.optimizer", "trainer.max_steps", "data.batch_size", "data.train", "trainer.precision"):
        assert row in page, row
    assert re.search(r"torch\.optim\.AdamW, lr [0-9.e-]+</code>", page)

    after = _tree_digest(run_dir)
    assert {k: v for k, v in after.items() if not k.startswith("report")} == before


@needs_matplotlib
def test_final_validation_table_matches_last_val_row(run_root, tmp_path):
    _report(str(run_root / "lightning_logs/version_0"), "--output_dir", str(tmp_path / "out"))
    page = (tmp_path / "out/report.html").read_text(encoding="utf-8")
    rows = list(csv.DictReader(open(run_root / "lightning_logs/version_0/metrics.csv")))
    last_val = [r for r in rows if any(r[c] for c in r if c.startswith("val/"))][-1]
    expected = {c: float(v) for c, v in last_val.items() if c.startswith("val/") and v}
    table = _final_val_rows(page)
    assert set(table) == set(expected) and "val/rewards/accuracies" in table
    for column, value in expected.items():
        assert table[column] == (pytest.approx(value, rel=1e-5, abs=1e-12), int(last_val["step"])), column


@needs_matplotlib
def test_completions_grouped_by_step_and_escaped(run_root, tmp_path):
    _report(str(run_root / "lightning_logs/version_0"), "--output_dir", str(tmp_path))
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<b>figo</b>" not in page and "<b>calm</b>" not in page  # user text never becomes markup
    headings = [page.index(f"<h3>Step {step}</h3>") for step in (2, 4)]
    for record in COMPLETIONS:
        section = page[headings[0]:headings[1]] if record["step"] == 2 else page[headings[1]:]
        for field in ("prompt", "policy", "reference"):
            if record[field] is not None:
                assert f"<td>{html.escape(record[field])}</td>" in section, (record["step"], field)
    # the null reference is a dash, in the step-2 table's second row
    second_row = page[headings[0]:headings[1]].split("<tr>")[3]
    assert html.escape(COMPLETIONS[1]["policy"]) in second_row and "—" in second_row


@needs_matplotlib
def test_kto_csv_gets_the_kl_plot(tmp_path):
    columns = ["train/kl", "train/loss", "val/kl", "val/loss", "val/rewards/accuracies"]
    _write_metrics(tmp_path / "run", columns)
    _report(str(tmp_path / "run"))
    page = (tmp_path / "run/report.html").read_text(encoding="utf-8")
    _assert_png((tmp_path / "run/report_kl.png").read_bytes())
    alts = re.findall(r'alt="([^"]*)"', page)
    assert alts == ["Loss", "Reward accuracy", "KL baseline z₀"]  # table order; only plots with data
    assert [base64.b64decode(d) for d in DATA_URI.findall(page)][-1] == (tmp_path / "run/report_kl.png").read_bytes()
    assert "No config.yaml" in page and "No completions.jsonl" in page


@needs_matplotlib
def test_new_metric_families_are_plotted_without_code_changes(tmp_path):
    columns = ["train/loss", "train/judge/score", "val/judge/score", "val/judge/win_rate",
               "train/rewards/chosen_std", "train/rewards/rejected_std"]
    _write_metrics(tmp_path / "run", columns)
    _report(str(tmp_path / "run"))
    page = (tmp_path / "run/report.html").read_text(encoding="utf-8")
    for name in ("report_loss.png", "report_metric_judge.png", "report_metric_rewards.png"):
        _assert_png((tmp_path / "run" / name).read_bytes())
    alts = re.findall(r'alt="([^"]*)"', page)
    assert alts == ["Loss", "judge/score, judge/win_rate", "rewards/chosen_std, rewards/rejected_std"]
    assert _final_val_rows(page).keys() == {"val/judge/score", "val/judge/win_rate"}


def test_a_family_of_metrics_gets_one_axis_each():
    """A score and a win rate (or an RL run's score, KL in nats and entropy) never share a y axis; the designed
    plots whose members share a unit (chosen and rejected rewards) keep one."""
    from lightning_pref.report import plan_plots

    plots = {p.name: p for p in plan_plots(["train/objective/scores", "train/objective/kl", "train/objective/entropy",
                                            "train/rewards/chosen", "train/rewards/rejected"])}
    family = plots["metric_objective"]
    assert [(p.title, p.suffixes) for p in family.panels()] == [
        ("objective/entropy", ("objective/entropy",)), ("objective/kl", ("objective/kl",)),
        ("objective/scores", ("objective/scores",))]
    assert plots["rewards"].panels() == [plots["rewards"]]


@needs_matplotlib
def test_regenerates_its_own_files_but_never_replaces_others(tmp_path, capsys):
    _write_metrics(tmp_path / "run", ["train/loss", "val/loss"])
    _report(str(tmp_path / "run"), "--output_dir", str(tmp_path / "out"))
    _report(str(tmp_path / "run"), "--output_dir", str(tmp_path / "out"))  # a rerun replaces its own report
    assert (tmp_path / "out/report.html").stat().st_size > 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/report.html").write_text("my notes")
    with pytest.raises(SystemExit) as exit_info:
        _report(str(tmp_path / "run"), "--output_dir", str(tmp_path / "mine"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "mine/report.html") in err and "--output_dir" in err
    assert (tmp_path / "mine/report.html").read_text() == "my notes"
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["report.html"]  # nothing half-written


@needs_matplotlib
def test_never_replaces_another_runs_report_and_drops_its_own_stale_plots(tmp_path, capsys):
    """A report into another run's directory replaced that run's report.html and left a mix of the two runs'
    plots; a rerun of the same run whose metrics lost a family left that family's old plot beside the new page."""
    _write_metrics(tmp_path / "a", ["train/loss", "val/loss", "train/judge/score"])
    _write_metrics(tmp_path / "b", ["train/loss", "val/loss"])
    _report(str(tmp_path / "a"))
    assert (tmp_path / "a/report_metric_judge.png").exists()
    before = _tree_digest(tmp_path / "a")
    with pytest.raises(SystemExit) as exit_info:
        _report(str(tmp_path / "b"), "--output_dir", str(tmp_path / "a"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --output_dir: {tmp_path / 'a'} holds the report of another run ({(tmp_path / 'a').resolve()}); "
                   "choose another directory (a run's report goes beside it by default)")
    assert _tree_digest(tmp_path / "a") == before
    _write_metrics(tmp_path / "a", ["train/loss", "val/loss"])  # the judge family is gone from the metrics
    _report(str(tmp_path / "a"))
    assert not (tmp_path / "a/report_metric_judge.png").exists() and (tmp_path / "a/report_loss.png").exists()


@pytest.mark.parametrize("case", ["missing", "empty", "file", "bad_cell", "bad_completions"])
def test_bad_input_is_one_line(tmp_path, capsys, case):
    run = tmp_path / "run"
    expected = {"missing": str(run), "empty": str(run), "file": str(run),
                "bad_cell": f"{run / 'metrics.csv'}:3", "bad_completions": f"{run / 'completions.jsonl'}:2"}[case]
    if case == "empty":
        run.mkdir()
    elif case == "file":
        run.write_text("not a directory")
    elif case != "missing":
        _write_metrics(run, ["train/loss"])
        if case == "bad_cell":
            lines = (run / "metrics.csv").read_text().splitlines()
            lines[2] = lines[2].rsplit(",", 1)[0] + ",oops"
            (run / "metrics.csv").write_text("\n".join(lines) + "\n")
        else:
            write_jsonl(run / "completions.jsonl", [COMPLETIONS[0], {"step": "2", "prompt": "p", "policy": "q"}])
    with pytest.raises(SystemExit) as exit_info:
        _report(str(run))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and expected in err and "Traceback" not in err
    assert not list(tmp_path.rglob("report*"))


def test_missing_matplotlib_names_the_extra(tmp_path, capsys, monkeypatch):
    _write_metrics(tmp_path / "run", ["train/loss"])
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if absent
    with pytest.raises(SystemExit) as exit_info:
        _report(str(tmp_path / "run"))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "pip install 'lightning-pref[report]'" in err


def test_newest_version_is_the_highest_number(tmp_path):
    for version in (2, 10, 9):
        _write_metrics(tmp_path / f"lightning_logs/version_{version}", ["train/loss"])
    (tmp_path / "lightning_logs/version_11").mkdir()  # a run that has not logged yet
    assert resolve_run_dir(tmp_path) == tmp_path / "lightning_logs/version_10"  # not the lexically last "9"
    assert resolve_run_dir(tmp_path / "lightning_logs") == tmp_path / "lightning_logs/version_10"
    assert resolve_run_dir(tmp_path / "lightning_logs/version_2") == tmp_path / "lightning_logs/version_2"


def test_newest_training_run_not_the_newest_version(tmp_path, capsys):
    """A validate or predict run gets a version_N of its own where its checkpoint is not a training run's (and
    did for every checkpoint before): report ROOT still means the newest run of fit."""
    logs = tmp_path / "lightning_logs"
    _write_metrics(logs / "version_0", ["train/loss", "val/loss"])
    (logs / "version_0/checkpoints").mkdir()
    _write_metrics(logs / "version_1", ["train/loss"])
    (logs / "version_1/run.yaml").write_text("command: fit\n")  # a recorded fit, checkpoints turned off
    _write_metrics(logs / "version_2", ["val/loss"])
    (logs / "version_2/run.yaml").write_text("command: validate\n")
    _write_metrics(logs / "version_3", ["val/loss"])  # an older validate run, without a record: no train/ values
    assert resolve_run_dir(tmp_path) == logs / "version_1"
    assert resolve_run_dir(logs / "version_3") == logs / "version_3"  # named, any run is reported
    for version in (0, 1):
        (logs / f"version_{version}/run.yaml").write_text("command: predict\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "no training run among version_0, version_1, version_2, version_3" in err


def _resumed_run(run: Path, steps: range, loss: float, resumed_from: Path | None = None) -> None:
    """A run's metrics.csv with ``train/loss`` = ``loss`` at ``steps``, and its run.yaml."""
    run.mkdir(parents=True)
    rows = "".join(f"0,{step},{loss}\n" for step in steps)
    (run / "metrics.csv").write_text(f"epoch,step,train/loss\n{rows}")
    record = {"command": "fit", "resumed_from": str(resumed_from / "checkpoints/last.ckpt") if resumed_from else None,
              "resumed_at_step": steps[0] if resumed_from else None}
    (run / "run.yaml").write_text(yaml.safe_dump(record))


def test_a_resumed_run_reports_its_whole_history(tmp_path, capsys):
    """Killed after step 7 with a checkpoint at step 6, resumed (version_1), killed again and resumed from step
    9 (version_2): the report of version_2 is steps 0-5 of version_0, 6-8 of version_1, then its own."""
    logs = tmp_path / "lightning_logs"
    _resumed_run(logs / "version_0", range(0, 8), 0.3)  # steps 6 and 7 were lost with the kill
    _resumed_run(logs / "version_1", range(6, 10), 0.2, resumed_from=logs / "version_0")
    _resumed_run(logs / "version_2", range(9, 12), 0.1, resumed_from=logs / "version_1")
    series, earlier = read_history(logs / "version_2")
    assert series["train/loss"] == [(s, 0.3) for s in range(6)] + [(s, 0.2) for s in (6, 7, 8)] + [
        (s, 0.1) for s in (9, 10, 11)]
    assert earlier == [(logs / "version_0", 6), (logs / "version_1", 9)]
    assert read_history(logs / "version_0")[1] == []
    if importlib.util.find_spec("matplotlib") is not None:
        _report(str(tmp_path))
        out = capsys.readouterr().out
        assert f"resumed from {logs / 'version_0'}: its metrics up to step 5 come first" in out
        assert "up to step 8" in (logs / "version_2/report.html").read_text()


def test_every_documented_metric_has_a_designed_plot():
    claimed = {suffix for plot in PLOTS for suffix in plot.suffixes}
    assert set(KEYS) <= claimed
