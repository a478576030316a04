"""What a study's analysis hands the report: tables of formatted cells, headline sentences, and
the statistics over seeds (mean, std, worst) that fill them."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Table:
    """A table as the report shows it: a title, column names, rows of formatted cells."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class Analysis:
    """A study's results, ready to render: headline sentences, tables, and the numbers that the
    study's figures are drawn from (``data``, free-form per study)."""

    title: str
    headline: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Stats:
    """Mean, sample standard deviation (0 for one value) and worst of some values."""

    n: int
    mean: float
    std: float
    worst: float


def stats(values: Iterable[float], *, higher_is_better: bool) -> Stats:
    """Statistics over seeds; *worst* is the minimum when higher is better, else the maximum.
    No values → NaN everywhere."""
    v = [float(x) for x in values]
    if not v:
        return Stats(0, math.nan, math.nan, math.nan)
    return Stats(len(v), statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0,
                 min(v) if higher_is_better else max(v))


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for a table: NaN or None as "–", thousands separated by a thin space."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}".replace(",", "\u2009")


def fmt_stats(s: Stats, digits: int = 3) -> str:
    """``mean ± std (worst w)``, each with ``digits`` decimals."""
    if s.n == 0:
        return "–"
    return f"{fmt(s.mean, digits)} ± {fmt(s.std, digits)} (worst {fmt(s.worst, digits)})"


def widths_text(widths: Sequence[int]) -> str:
    """(5, 5, 1) → ``(5, 5, 1)``, as the thesis writes a configuration."""
    return "(" + ", ".join(map(str, widths)) + ")"


def widths_counts(found: Sequence[Sequence[int]], top: int = 3) -> str:
    """The distinct configurations among the seeds' results, most frequent first (then fewest
    masks): ``(4, 4, 1) ×3, (3, 4, 1) ×1``; more than ``top`` end with "…"."""
    counts: dict[tuple[int, ...], int] = {}
    for w in found:
        counts[tuple(w)] = counts.get(tuple(w), 0) + 1
    order = sorted(counts, key=lambda w: (-counts[w], sum(w), w))
    text = ", ".join(f"{widths_text(w)} ×{counts[w]}" for w in order[:top])
    return (text + (", …" if len(order) > top else "")) or "–"


def plural(n: int, word: str) -> str:
    """``plural(1, "seed")`` → "1 seed", ``plural(2, "seed")`` → "2 seeds"."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def seconds_text(seconds: float) -> str:
    if seconds is None or math.isnan(seconds):
        return "–"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def failures_table(records: dict[str, dict[str, Any]], plan: list[dict[str, Any]]) -> Table | None:
    """Failed and missing trials, or None when every planned trial is done."""
    rows = []
    for trial in plan:
        rec = records.get(trial["id"])
        if rec is None:
            rows.append([trial["id"], "not run yet", ""])
        elif rec.get("status") != "done":
            rows.append([trial["id"], "failed", rec.get("error", "")])
    if not rows:
        return None
    return Table("Trials not done", ["trial", "status", "error"], rows,
                 "Running the same study command again runs these trials (and only these).")
