"""The ``strategies`` study (thesis 4.3, Fig 4.2): strategies × thresholds × R seeds on one task.

For every seed one base network (the thesis's 5/5/1) is trained from scratch; every (strategy,
threshold) minimizes a copy of it with that seed. Per cell (strategy, threshold) the seeds give
mean, std and worst of: final/base score (the relative drop), active prunable masks, parameters,
MACs per pixel, training steps of the minimization (fine-tune included) and wall time. The
figure shows the score drop and the masks removed against the threshold, one line per strategy,
error bars ± one standard deviation over seeds, in the manner of Fig 4.2.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfscale.study.specs import (THESIS_WIDTHS, MinimizingSpec, _names, check_strategies,
                                   minimize_trial, train_trial)
from selfscale.study.tables import (Analysis, Table, failures_table, fmt, fmt_stats, plural,
                                    seconds_text, stats, widths_counts, widths_text)

NAME = "strategies"
SCALES = {
    "smoke": {"strategies": ("cosmax", "l1")},
    "laptop": {"strategies": ("cosmax", "l1", "taylor", "random", "seq")},
    "thesis": {"strategies": ("cosmax", "cosmean", "cosmin", "cosstd", "cosmedian", "random",
                              "seq")},
}
"""This study's own scale values (the shared ones are in :data:`selfscale.study.specs.SCALES`)."""
DESCRIPTION = ("Thesis 4.3 (Fig 4.2): minimize one base network per seed with every strategy at "
               "every threshold; per cell the mean, std and worst over seeds of final/base score, "
               "active masks, parameters, MACs per pixel, training steps and wall time.")


@dataclass(frozen=True)
class Spec(MinimizingSpec):
    """The strategies study."""

    strategies: tuple[str, ...]
    """--strategies: comma-separated selection strategies (smoke cosmax,l1; laptop
    cosmax,l1,taylor,random,seq; thesis the cos* family, random and seq)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "strategies", _names(self.strategies, "--strategies"))
        check_strategies(self.strategies, "--strategies")


def plan(spec: Spec) -> list[dict[str, Any]]:
    """One base network per seed, then every strategy × threshold minimizing it."""
    trials = []
    for seed in range(spec.seeds):
        base = train_trial(spec, THESIS_WIDTHS, seed)
        trials.append(base)
        trials += [minimize_trial(spec, base, strategy, threshold, seed)
                   for strategy in spec.strategies for threshold in spec.thresholds]
    return trials


CAPTION = ("Score drop (1 − final/base) and masks removed against the threshold, one line per "
           "strategy; error bars: ± one standard deviation over seeds.")
METRICS = (  # (result key, column, higher is better, decimals)
    ("ratio", "final/base score", True, 3),
    ("masks_after", "active masks", False, 1),
    ("parameters_after", "parameters", False, 0),
    ("macs_per_pixel_after", "MACs per pixel", False, 0),
    ("steps_trained", "training steps", False, 0),
    ("seconds", "wall time (s)", False, 1),
)


def cells(spec: Spec, plan_: list[dict[str, Any]],
          records: dict[str, dict[str, Any]]) -> dict[tuple[str, float], dict[str, Any]]:
    """(strategy, threshold) → {"planned", "done", metric → Stats, "drop", "removed", "widths"}."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    planned: dict[tuple[str, float], int] = defaultdict(int)
    for trial in plan_:
        if trial["kind"] != "minimize":
            continue
        key = (trial["strategy"], trial["threshold"])
        planned[key] += 1
        rec = records.get(trial["id"])
        if rec is not None and rec.get("status") == "done":
            groups[key].append(rec["result"])
    out = {}
    for key, n in planned.items():
        rs = groups[key]
        cell: dict[str, Any] = {"planned": n, "done": len(rs)}
        for name, _, higher, _ in METRICS:
            cell[name] = stats((r[name] for r in rs), higher_is_better=higher)
        cell["drop"] = stats((1 - r["ratio"] for r in rs), higher_is_better=False)
        cell["removed"] = stats((r["masks_removed"] for r in rs), higher_is_better=True)
        cell["widths"] = [tuple(r["widths_after"]) for r in rs]
        out[key] = cell
    return out


def base_table(plan_: list[dict[str, Any]], records: dict[str, dict[str, Any]]) -> Table:
    rows = []
    for trial in plan_:
        rec = records.get(trial["id"])
        if trial["kind"] != "train" or rec is None or rec.get("status") != "done":
            continue
        r = rec["result"]
        rows.append([str(trial["seed"]), widths_text(r["widths"]), fmt(r["scores"]["f1"]),
                     fmt(r["scores"]["uiqi"]), fmt(r["scores"]["mae"], 4), fmt(r["steps"], 0),
                     seconds_text(r["seconds"]), "yes" if r["dead"] else "no"])
    return Table("Base networks", ["seed", "widths", "F1", "UIQI", "MAE", "steps", "wall time",
                                   "dead"], rows, "Held-out scores of each seed's base network "
                 "(evaluation centre crops of the bundled eval images).")


def analyse(spec: Spec, plan_: list[dict[str, Any]],
            records: dict[str, dict[str, Any]], directory: Path) -> Analysis:
    """The tables and figure data of a strategies study directory."""
    by_cell = cells(spec, plan_, records)
    rows = []
    for (strategy, threshold), cell in by_cell.items():
        rows.append([strategy, f"{threshold:.2f}", f"{cell['done']}/{cell['planned']}",
                     widths_counts(cell["widths"])]
                    + [fmt_stats(cell[name], digits) for name, _, _, digits in METRICS])
    table = Table(f"Strategies × thresholds ({spec.task})",
                  ["strategy", "threshold", "seeds", "widths after (× seeds)"]
                  + [column for _, column, _, _ in METRICS], rows,
                  "Each cell: mean ± std over seeds (worst: lowest score, highest count). "
                  "Active masks are the prunable masks (hidden layers) left; training steps "
                  "count every step the minimization spent, fine-tune included.")
    best = _summary_sentence(spec, by_cell)
    tables = [table, base_table(plan_, records)]
    failed = failures_table(records, plan_)
    if failed is not None:
        tables.append(failed)
    series = {s: [(t, by_cell[s, t]["drop"], by_cell[s, t]["removed"]) for t in spec.thresholds
                  if (s, t) in by_cell] for s in spec.strategies}
    return Analysis(
        title=f"Strategies × thresholds on {spec.task} ({spec.scale} scale)",
        headline=[best] if best else [], tables=tables,
        data={"series": series, "task": spec.task, "reference": spec.reference,
              "seeds": spec.seeds},
        notes=[(f"Reference: {spec.reference}; layer removal {'on' if spec.layers else 'off'}; "
                f"{spec.retrain_steps} retrain steps per decision, {spec.finetune_steps} "
                f"fine-tune steps; base networks: {spec.base_steps} steps with the "
                f"{spec.recipe} recipe.")])


def _summary_sentence(spec: Spec, by_cell: dict) -> str:
    """Which strategy removed the most masks on average at the median threshold."""
    ts = sorted(spec.thresholds)
    mid = ts[len(ts) // 2]
    done = [(s, by_cell[s, mid]) for s in spec.strategies
            if (s, mid) in by_cell and by_cell[s, mid]["done"]]
    if not done:
        return ""
    s, cell = max(done, key=lambda sc: (sc[1]["removed"].mean, -sc[1]["drop"].mean))
    return (f"At threshold {mid:.2f}, {s} removed the most masks: {cell['removed'].mean:.1f} of "
            f"{sum(THESIS_WIDTHS[:-1])} on average over {plural(cell['done'], 'seed')}, keeping "
            f"{cell['ratio'].mean:.3f} of the base score (worst {cell['ratio'].worst:.3f}).")


def draw(analysis: Analysis, folder: Path) -> list[tuple[str, Path]]:
    """The Fig 4.2-style figure: (caption, PNG path) pairs; an SVG is written beside each PNG."""
    from selfscale.study.figures import threshold_panels

    d = analysis.data
    series = {s: points for s, points in d["series"].items() if points}
    png = threshold_panels(series, Path(folder) / "strategies",
                           title=f"{d['task']}: minimization against the threshold "
                                 f"(reference {d['reference']}, {plural(d['seeds'], 'seed')})")
    return [(CAPTION, png)]
