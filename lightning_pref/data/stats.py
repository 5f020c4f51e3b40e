"""What loading kept and dropped, per split, and the summary table printed after loading."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table


@dataclass
class SplitStats:
    """Counts of one split, stored on the data module as ``dm.stats[split]``.

    Attributes:
        source: the file or dataset the split came from.
        format: the detected (or configured) data format.
        kept: examples in the split (after ``data.unpair``, two per pair).
        dropped: reason -> number of source rows dropped: ``identical``, ``truncated``, and with
            ``data.on_invalid: drop`` the failed check (``wrong type``, ``empty response``, ...).
        length_p50, length_p90, length_max: tokens of prompt + longest response over kept examples.
    """

    source: str
    format: str
    kept: int
    dropped: dict[str, int] = field(default_factory=dict)
    length_p50: int = 0
    length_p90: int = 0
    length_max: int = 0

    @classmethod
    def build(cls, source: str, format: str, lengths: list[int], dropped: dict[str, int]) -> SplitStats:
        ordered = sorted(lengths)

        def pct(q: float) -> int:  # nearest-rank percentile; enough for a summary
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0

        return cls(source, format, len(ordered), {k: v for k, v in dropped.items() if v}, pct(0.5), pct(0.9),
                   ordered[-1] if ordered else 0)


def summary_table(stats: dict[str, SplitStats]) -> Table:
    """One row per split: kept, dropped and why, token length percentiles."""
    table = Table(title="preference data", title_justify="left")
    for column in ("split", "source", "format", "kept", "dropped", "tokens p50/p90/max"):
        table.add_column(column, justify="right" if column in ("kept",) else "left")
    for split, s in stats.items():
        dropped = ", ".join(f"{n} {why}" for why, n in s.dropped.items()) or "0"
        source = Path(s.source).name if Path(s.source).exists() else s.source  # file name; dataset ids whole
        table.add_row(split, source, s.format, str(s.kept), dropped, f"{s.length_p50}/{s.length_p90}/{s.length_max}")
    return table


def print_summary(stats: dict[str, SplitStats]) -> None:
    """Print :func:`summary_table` to stderr (stdout stays for results)."""
    Console(stderr=True).print(summary_table(stats))
