"""The ``correlation`` study (thesis 4.1–4.2, Table 4.1 and Fig 4.1): what predicts a mask's worth?

R repetitions (seeds) of: train a base network (the thesis's 5/5/1) for ``--base-steps``; a
*reference* continues it ``--retrain-steps`` N more steps undisturbed; and, from the same base,
for each mask of layers 1 and 2 in turn: disable it (disabled-frozen), train N steps. Every one
of these is evaluated right away and every ``--judge-every`` k steps (:mod:`selfscale.study.
worth`). With ``rel(t) = score(t) / reference score(t)`` at the same step t (F1 on the eval crops;
at t = 0 the reference is the base network), per mask:

* **loss** = 1 − rel(0), the score lost right after disabling (the thesis's *loss*; **drop**
  in Fig 4.1 is the same number);
* **best** = max over t ≥ k of rel(t), the best reached while retraining (the thesis's *best*);
* **final** = rel(N);
* **gain** = best − rel(0), what retraining won back.

Each mask also has its features on the base network (:data:`~selfscale.study.worth.FEATURES`):
the cosine aggregations of the thesis over its similarities to the other masks of its layer
(max, 2. max, 3. max, min, mean, std, median; the same over absolute values) and the l1, taylor
and fpgm scores. Table 4.1 gives, for each feature, the Pearson, Kendall (τ-b) and Spearman
correlation (``scipy.stats``, with their two-sided p-values) with *loss* and with *best* over every
mask of every repetition. Fig 4.1 plots drop against gain per mask.

Files (beside the report): ``correlation.csv`` and ``correlation.md`` (Table 4.1) and
``masks.csv`` (the raw per-mask table, from which every coefficient can be recomputed).
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfscale.config import _check, _int
from selfscale.study.specs import MAX_STEPS, THESIS_WIDTHS, StudySpec, train_trial
from selfscale.study.tables import Analysis, Table, failures_table, fmt, plural

NAME = "correlation"
SCALES = {
    "smoke": {"retrain_steps": 60, "judge_every": 20},
    "laptop": {"seeds": 4, "retrain_steps": 400, "judge_every": 100},
    "thesis": {"seeds": 10, "retrain_steps": 2000, "judge_every": 250},
}
"""This study's own scale values (the shared ones are in :data:`selfscale.study.specs.SCALES`);
thesis: 10 repetitions × 10 masks = 100 masks per correlation."""
DESCRIPTION = ("Thesis 4.1-4.2 (Table 4.1, Fig 4.1): disable each mask of layers 1 and 2 of a "
               "trained network in turn, retrain, and correlate how much it cost (loss, best) "
               "with the cosine aggregations and the l1, taylor and fpgm scores.")
LAYERS = (1, 2)
"""The layers whose masks are studied (the hidden layers of the thesis network)."""
TARGETS = ("loss", "best")
METHODS = ("pearson", "kendall", "spearman")
LABELS = {"cos_max": "max", "cos_2nd_max": "2. max", "cos_3rd_max": "3. max", "cos_min": "min",
          "cos_mean": "mean", "cos_std": "std", "cos_median": "median", "abs_max": "abs max",
          "abs_2nd_max": "abs 2. max", "abs_3rd_max": "abs 3. max", "abs_min": "abs min",
          "abs_mean": "abs mean", "abs_std": "abs std", "abs_median": "abs median", "l1": "l1",
          "taylor": "taylor", "fpgm": "fpgm"}
"""Feature → its row name in Table 4.1 (cosine aggregations as the thesis names them)."""
MASK_COLUMNS = ("seed", "layer", "mask", "score_0", "reference_0", "loss", "best", "best_step",
                "final", "drop", "gain")
CAPTION = ("Drop (score lost right after disabling, relative to the reference) against gain "
           "(what retraining won back, best − rel(0)) per mask: all layers, then per layer; "
           "dots: every choice (colour: layer), stars: the best choice per network (the mask "
           "with the highest best).")


@dataclass(frozen=True)
class Spec(StudySpec):
    """The correlation study."""

    retrain_steps: int
    """--retrain-steps: N, the training steps after disabling each mask and of the undisturbed
    reference (smoke 60, laptop 400, thesis 2000)."""
    judge_every: int
    """--judge-every: k, evaluate every k steps of those N (smoke 20, laptop 100, thesis
    250)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(_int(self.retrain_steps) and 1 <= self.retrain_steps <= MAX_STEPS,
               "--retrain-steps", self.retrain_steps, f"must be an integer from 1 to {MAX_STEPS}")
        _check(_int(self.judge_every) and 1 <= self.judge_every <= self.retrain_steps,
               "--judge-every", self.judge_every,
               f"must be an integer from 1 to --retrain-steps ({self.retrain_steps})")


def worth_trial(spec: Spec, base: dict[str, Any], seed: int, layer: int | None = None,
                mask: int | None = None) -> dict[str, Any]:
    """The reference (no mask) or the disabling of ``mask`` of ``layer`` (1-based)."""
    name = "ref" if layer is None else f"l{layer}m{mask}"
    return {"id": f"worth-{name}-s{seed}", "kind": "worth", "needs": base["id"], "seed": seed,
            "layer": layer, "mask": mask, "steps": spec.retrain_steps, "every": spec.judge_every}


def plan(spec: Spec) -> list[dict[str, Any]]:
    """Per seed: the base network, its reference, and one trial per mask of layers 1 and 2."""
    trials = []
    for seed in range(spec.seeds):
        base = train_trial(spec, THESIS_WIDTHS, seed)
        trials += [base, worth_trial(spec, base, seed)]
        trials += [worth_trial(spec, base, seed, layer, mask)
                   for layer in LAYERS for mask in range(1, THESIS_WIDTHS[layer - 1] + 1)]
    return trials


# --- analysis -----------------------------------------------------------------------------------

def mask_rows(plan_: list[dict[str, Any]], records: dict[str, dict[str, Any]],
              metric: str = "f1") -> list[dict[str, Any]]:
    """The raw per-mask table: :data:`MASK_COLUMNS` then every feature, one row per finished
    mask trial whose reference finished too (see the module docstring for the definitions)."""
    def done(tid: str) -> dict[str, Any] | None:
        rec = records.get(tid)
        return rec["result"] if rec and rec.get("status") == "done" else None

    rows = []
    for trial in plan_:
        if trial["kind"] != "worth" or trial["layer"] is None:
            continue
        res, ref = done(trial["id"]), done(f"worth-ref-s{trial['seed']}")
        if res is None or ref is None:
            continue
        ref_at = dict(zip(ref["curve"]["step"], ref["curve"][metric]))
        rel = [(t, s / ref_at[t] if ref_at.get(t) else math.nan)
               for t, s in zip(res["curve"]["step"], res["curve"][metric]) if t in ref_at]
        start = rel[0][1]
        best_step, best = max(rel[1:], key=lambda p: p[1], default=(0, start))
        rows.append({"seed": trial["seed"], "layer": trial["layer"], "mask": trial["mask"],
                     "score_0": res["curve"][metric][0], "reference_0": ref["curve"][metric][0],
                     "loss": 1 - start, "best": best, "best_step": best_step,
                     "final": rel[-1][1], "drop": 1 - start, "gain": best - start,
                     **res["features"]})
    return rows


def correlate(xs: list[float], ys: list[float]) -> dict[str, tuple[float, float]]:
    """Pearson, Kendall (τ-b) and Spearman coefficient and two-sided p-value of the pairs where
    both values are finite (scipy.stats); fewer than 3 pairs or a constant side → NaN."""
    from scipy import stats

    pairs = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
    nan = (math.nan, math.nan)
    if len(pairs) < 3 or len({x for x, _ in pairs}) < 2 or len({y for _, y in pairs}) < 2:
        return dict.fromkeys(METHODS, nan)
    x, y = zip(*pairs)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fn in (("pearson", stats.pearsonr), ("kendall", stats.kendalltau),
                         ("spearman", stats.spearmanr)):
            r = fn(x, y)
            out[name] = (float(r.statistic), float(r.pvalue))
    return out


def table_41(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, tuple]]]:
    """feature → target (loss, best) → method → (coefficient, p-value)."""
    return {f: {t: correlate([r[f] for r in rows], [r[t] for r in rows]) for t in TARGETS}
            for f in LABELS}


def _coef(value: tuple[float, float]) -> list[str]:
    return [fmt(value[0], 3), fmt(value[1], 3) if value[1] >= 0.001 else "< 0.001"]


def analyse(spec: Spec, plan_: list[dict[str, Any]], records: dict[str, dict[str, Any]],
            directory: Path) -> Analysis:
    """Table 4.1, the per-mask table and the drop-gain data of a correlation study directory."""
    rows = mask_rows(plan_, records)
    coefs = table_41(rows)
    columns = ["aggregation"] + [c for t in TARGETS for m in METHODS for c in (f"{t}: {m}", "p")]
    table = Table(f"Table 4.1: correlation with loss and best ({plural(len(rows), 'mask')})",
                  columns, [[LABELS[f]] + [c for t in TARGETS for m in METHODS
                                          for c in _coef(coefs[f][t][m])] for f in LABELS],
                  "Pearson, Kendall (τ-b) and Spearman coefficients over every mask of every "
                  "repetition, each with its two-sided p-value (scipy.stats). loss = 1 − "
                  "rel(0), best = the best rel(t) while retraining, rel = score / the "
                  "reference's score at the same step.")
    tables = [table]
    if len(rows) <= 120:
        tables.append(Table("Every mask", ["seed", "layer", "mask", "loss", "best", "final",
                                           "gain", "max", "l1", "taylor", "fpgm"],
                            [[str(r["seed"]), str(r["layer"]), str(r["mask"]), fmt(r["loss"]),
                              fmt(r["best"]), fmt(r["final"]), fmt(r["gain"]),
                              fmt(r["cos_max"]), fmt(r["l1"], 4), fmt(r["taylor"]),
                              fmt(r["fpgm"])] for r in rows],
                            "All columns, every feature included, are in masks.csv."))
    failed = failures_table(records, plan_)
    if failed is not None:
        tables.append(failed)
    return Analysis(
        title=f"What predicts a mask's worth? {spec.task} ({spec.scale} scale)",
        headline=_headline(coefs, len(rows)), tables=tables,
        data={"rows": rows, "coefs": coefs, "task": spec.task, "seeds": spec.seeds},
        notes=[(f"{spec.seeds} repetition(s): base networks of {spec.base_steps} steps with the "
                f"{spec.recipe} recipe; the reference and every disabled mask (disabled-frozen) "
                f"then train {spec.retrain_steps} steps (Adam reset, schedule restarted), "
                f"evaluated every {spec.judge_every} steps on F1.")])


def _headline(coefs: dict, n: int) -> list[str]:
    """The feature whose Spearman correlation with loss is strongest, and where max stands."""
    known = {f: c["loss"]["spearman"] for f, c in coefs.items()
             if math.isfinite(c["loss"]["spearman"][0])}
    if not known:
        return []
    top = max(known, key=lambda f: abs(known[f][0]))
    text = (f"Over {plural(n, 'mask')}, {LABELS[top]} has the strongest Spearman correlation "
            f"with loss: ρ = {known[top][0]:.3f} (p = {known[top][1]:.3g})")
    if "cos_max" in known and top != "cos_max":
        text += f"; max (CosMax): ρ = {known['cos_max'][0]:.3f} (p = {known['cos_max'][1]:.3g})"
    return [text + "."]


def _csv(rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def write_tables(analysis: Analysis, out: Path) -> list[Path]:
    """``correlation.csv`` (full precision), ``correlation.md`` (Table 4.1 as in the report) and
    ``masks.csv`` (the raw per-mask table) in ``out``, each written atomically."""
    from selfscale.checkpoint import atomic_write_text
    from selfscale.study.worth import FEATURES

    coefs, rows = analysis.data["coefs"], analysis.data["rows"]
    head = ["aggregation", "feature"] + [f"{t}_{m}{s}" for t in TARGETS for m in METHODS
                                         for s in ("", "_p")]
    body = [[LABELS[f], f] + [v for t in TARGETS for m in METHODS for v in coefs[f][t][m]]
            for f in LABELS]
    columns = [*MASK_COLUMNS, *FEATURES]
    table = analysis.tables[0]
    md = [f"# {table.title}", "", table.note, "", "| " + " | ".join(table.columns) + " |",
          "|" + "---|" * len(table.columns)] + ["| " + " | ".join(r) + " |" for r in table.rows]
    paths = [Path(out) / n for n in ("correlation.csv", "correlation.md", "masks.csv")]
    atomic_write_text(paths[0], _csv([head, *body]))
    atomic_write_text(paths[1], "\n".join(md) + "\n")
    atomic_write_text(paths[2], _csv([list(columns), *[[r[c] for c in columns] for r in rows]]))
    return paths


def draw(analysis: Analysis, folder: Path) -> list[tuple[str, Path]]:
    """Fig 4.1: drop against gain, all layers and per layer (PNG and SVG)."""
    from selfscale.study.figures import drop_gain_panels

    d = analysis.data
    points = [(r["seed"], r["layer"], r["mask"], r["drop"], r["gain"], r["best"])
              for r in d["rows"]]
    png = drop_gain_panels(points, LAYERS, Path(folder) / "drop-gain",
                           title=f"{d['task']}: drop against gain per mask "
                                 f"({plural(d['seeds'], 'repetition')})")
    return [(CAPTION, png)]
