"""The ``gridsearch`` study (the thesis's motivation): every width configuration trained from
scratch, against the minimizer.

Every configuration (w1, w2, 1) with w1, w2 ∈ 1..N (``--max-width``, default 5; ``--depths 2,3,4``
adds (w1, 1) and (w1, w2, w3, 1)) is trained from scratch with the base budget, R seeds each. For
each threshold t the grid's answer is the smallest configuration — by MACs per pixel, then by
parameters — whose mean score over seeds is ≥ t × the mean score of the full network (N, N, 1).
Grid search has to train every configuration to know that, so its cost is all of them: N
configurations × R seeds × base steps, and the sum of their wall times.

The minimizer's answer for the same task, threshold and seeds comes from a ``strategies`` study
(``--minimizer DIR``, which must have trained its base networks the same way) or is run alongside
(``--strategy``, default l1) on the grid's own (N, N, 1) networks, which are the minimizer's base
networks (trained once, shared). Its answer is the most common minimized configuration over the
seeds; its cost is, summed over the seeds, the base network's steps plus every step the
minimization spent.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfscale.config import ModelConfig, _check, _int
from selfscale.errors import ConfigError, SelfscaleError
from selfscale.study.specs import (THESIS_WIDTHS, MinimizingSpec, _numbers, check_strategies,
                                   minimize_trial, path_or_none, train_trial)
from selfscale.study.tables import (Analysis, Table, failures_table, fmt, fmt_stats, plural,
                                    seconds_text, stats, widths_text)

NAME = "gridsearch"
SCALES = {
    "smoke": {"seeds": 1, "max_width": 5, "depths": (3,), "strategy": "l1", "minimizer": None},
    "laptop": {"max_width": 5, "depths": (3,), "strategy": "l1", "minimizer": None},
    "thesis": {"max_width": 5, "depths": (3,), "strategy": "l1", "minimizer": None},
}
"""This study's own scale values (the shared ones are in :data:`selfscale.study.specs.SCALES`)."""
DESCRIPTION = ("Train every width configuration (w1, w2, 1), w1, w2 in 1..5, from scratch with "
               "the base budget, R seeds each; per threshold the smallest one within threshold × "
               "the full network's score, with grid search's cost, next to the minimizer's answer "
               "and cost.")
DEPTHS = (2, 3, 4)
BASE_FIELDS = ("task", "recipe", "base_steps", "train_crop", "crop", "batch", "eval_every")
"""What a --minimizer study must share with this one (how the base networks are trained)."""
CAPTION = ("Mean score relative to the full network against MACs per pixel, for every "
           "configuration trained from scratch (error bars ± one standard deviation over seeds) "
           "and the minimizer's most common result per threshold (stars); right: the (w1, w2, 1) "
           "grid.")
KERNEL = ModelConfig.kernel
"""Every study network's mask size (the run config's default)."""


@dataclass(frozen=True)
class Spec(MinimizingSpec):
    """The grid search study."""

    max_width: int
    """--max-width: every hidden layer's width runs from 1 to N (default 5, the thesis's)."""
    depths: tuple[int, ...]
    """--depths: numbers of layers searched, from 2, 3, 4 (default 3: (w1, w2, 1))."""
    strategy: str
    """--strategy: the minimizer's strategy compared with grid search (default l1)."""
    minimizer: str | None
    """--minimizer: a strategies study directory (same task and base training) to take the
    minimizer's results from; default: run the minimizer alongside, on the grid's own full
    networks."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(_int(self.max_width) and 1 <= self.max_width <= 16, "--max-width",
               self.max_width, "must be an integer from 1 to 16")
        object.__setattr__(self, "depths", _numbers(self.depths, "--depths", int))
        _check(set(self.depths) <= set(DEPTHS), "--depths", ",".join(map(str, self.depths)),
               "each must be 2, 3 or 4")
        check_strategies((self.strategy,), "--strategy")
        object.__setattr__(self, "minimizer", path_or_none(self.minimizer, "--minimizer"))

    @property
    def full(self) -> tuple[int, ...]:
        """The full network: every hidden layer at --max-width, as (N, N, 1)."""
        return (self.max_width, self.max_width, 1)


def configurations(spec: Spec) -> list[tuple[int, ...]]:
    """Every searched configuration, the full network included, by depth then widths."""
    out = [w + (1,) for depth in spec.depths
           for w in itertools.product(range(1, spec.max_width + 1), repeat=depth - 1)]
    return out if spec.full in out else out + [spec.full]


def plan(spec: Spec) -> list[dict[str, Any]]:
    """Every configuration × seed trained from scratch; with no --minimizer, the minimizer
    alongside on the full networks (which are its base networks)."""
    trials = [train_trial(spec, widths, seed)
              for widths in configurations(spec) for seed in range(spec.seeds)]
    if spec.minimizer is None:
        for seed in range(spec.seeds):
            base = train_trial(spec, spec.full, seed)
            trials += [minimize_trial(spec, base, spec.strategy, t, seed)
                       for t in spec.thresholds]
    return trials


def check(spec: Spec) -> None:
    """A --minimizer directory must be a strategies study of the same task and base training,
    with this strategy, on the thesis network."""
    if spec.minimizer is None:
        return
    from selfscale.study.directory import read_study

    try:
        other = read_study(Path(spec.minimizer))["spec"]
    except SelfscaleError as exc:
        raise ConfigError(f"--minimizer: {exc}") from None
    _check(other["study"] == "strategies", "--minimizer", spec.minimizer,
           f"must be a strategies study directory (it holds a {other['study']} study)")
    for key in BASE_FIELDS:
        if other.get(key) != getattr(spec, key):
            raise ConfigError(f"--minimizer: {spec.minimizer} trained its base networks with "
                              f"--{key.replace('_', '-')} {other.get(key)} (this study: "
                              f"{getattr(spec, key)}); compare studies that train alike")
    _check(spec.strategy in other["strategies"], "--strategy", spec.strategy,
           f"is not in the --minimizer study (it ran {', '.join(other['strategies'])})")
    _check(spec.full == THESIS_WIDTHS, "--max-width", spec.max_width,
           "must be 5 with --minimizer (a strategies study minimizes (5, 5, 1))")


def _minimizer_runs(spec: Spec, records: dict[str, dict[str, Any]]) -> dict:
    """threshold → list of (base result, minimization result) over the seeds that finished."""
    source = records
    if spec.minimizer is not None:
        from selfscale.study.engine import load_records

        source = load_records(Path(spec.minimizer))
    out: dict[float, list] = defaultdict(list)
    for t in spec.thresholds:
        for seed in range(spec.seeds):
            base = source.get(f"train-{'x'.join(map(str, spec.full))}-s{seed}")
            run = source.get(f"min-{spec.strategy}-t{t:g}-s{seed}")
            if base and run and base.get("status") == run.get("status") == "done":
                out[t].append((base["result"], run["result"]))
    return out


def _minimizer_answer(pairs: list) -> tuple[tuple[int, ...] | None, int, int, float]:
    """From (base, minimization) results over seeds: the most common minimized configuration
    (ties: fewer MACs), in how many seeds, and the steps and seconds spent in all (base training
    included)."""
    from selfscale.model import macs_per_pixel

    found = Counter(tuple(m["widths_after"]) for _, m in pairs)
    mine = min(found, key=lambda w: (-found[w], macs_per_pixel(w, KERNEL))) if found else None
    return (mine, found[mine] if mine else 0,
            sum(b["steps"] + m["steps_trained"] for b, m in pairs),
            sum(b["seconds"] + m["seconds"] for b, m in pairs))


def analyse(spec: Spec, plan_: list[dict[str, Any]], records: dict[str, dict[str, Any]],
            directory: Path) -> Analysis:
    """The grid's answer per threshold next to the minimizer's, every configuration, and the
    headline sentence."""
    from selfscale.model import macs_per_pixel, parameter_count

    groups: dict[tuple[int, ...], list[dict]] = defaultdict(list)
    for trial in plan_:
        rec = records.get(trial["id"])
        if trial["kind"] == "train" and rec and rec.get("status") == "done":
            groups[tuple(trial["widths"])].append(rec["result"])
    configs = configurations(spec)
    full = stats((r["scores"]["f1"] for r in groups[spec.full]), higher_is_better=True)
    size = {w: (macs_per_pixel(w, KERNEL), parameter_count(w, KERNEL)) for w in configs}
    rel = {w: stats((r["scores"]["f1"] / full.mean for r in groups[w]), higher_is_better=True)
           for w in configs if groups[w] and full.n and full.mean > 0}
    n_grid, grid_steps = len(configs), len(configs) * spec.seeds * spec.base_steps
    grid_wall = sum(r["seconds"] for rs in groups.values() for r in rs)
    runs = _minimizer_runs(spec, records)
    rows, points, answers = [], [], {}
    for t in spec.thresholds:
        ok = [w for w in configs if w in rel and rel[w].mean >= t]
        grid = min(ok, key=lambda w: size[w]) if ok else None
        pairs = runs.get(t, [])
        mine, found, y, y_wall = _minimizer_answer(pairs)
        ratio = stats((m["ratio"] for _, m in pairs), higher_is_better=True)
        answers[t] = (grid, mine, y, len(pairs))
        if mine is not None:
            points.append((t, mine, ratio.mean, macs_per_pixel(mine, KERNEL)))
        rows.append([f"{t:.2f}", widths_text(grid) if grid else "–",
                     fmt(rel[grid].mean) if grid else "–",
                     fmt(size[grid][0], 0) if grid else "–", fmt(grid_steps, 0),
                     seconds_text(grid_wall),
                     (f"{widths_text(mine)} in {found} of {len(pairs)}" if mine else "–"),
                     fmt_stats(ratio), fmt(macs_per_pixel(mine, KERNEL), 0) if mine else "–",
                     fmt(y, 0) if pairs else "–", seconds_text(y_wall) if pairs else "–"])
    source = (f"the strategies study in {spec.minimizer}" if spec.minimizer
              else "minimizations run alongside, on this study's full networks")
    answer = Table("Grid search against the minimizer", [
        "threshold", "grid: smallest configuration", "its score / full", "MACs per pixel",
        "grid: training steps", "grid: wall time", "minimizer: most common result",
        "minimizer: final/base score", "MACs per pixel", "minimizer: training steps",
        "minimizer: wall time"], rows,
        f"Grid: smallest by MACs per pixel, then parameters, whose mean score over "
        f"{plural(spec.seeds, 'seed')} is ≥ threshold × the full network's ({fmt(full.mean)}); "
        f"its cost is every configuration trained. Minimizer: {spec.strategy}, from {source}; "
        "its cost is base training plus every minimization step, summed over the seeds.")
    every = Table("Every configuration", ["widths", "seeds", "F1", "score / full", "parameters",
                                          "MACs per pixel", "wall time (all seeds)"], [
        [widths_text(w), str(len(groups[w])),
         fmt_stats(stats((r["scores"]["f1"] for r in groups[w]), higher_is_better=True)),
         fmt(rel[w].mean) if w in rel else "–", fmt(size[w][1], 0), fmt(size[w][0], 0),
         seconds_text(sum(r["seconds"] for r in groups[w]))] for w in configs],
        "F1: mean ± std over seeds (worst) on the held-out evaluation crops.")
    tables = [answer, every]
    failed = failures_table(records, plan_)
    if failed is not None:
        tables.append(failed)
    heat = None
    if 3 in spec.depths:
        n = spec.max_width
        heat = ([[rel[(a, b, 1)].mean if (a, b, 1) in rel else float("nan")
                  for b in range(1, n + 1)] for a in range(1, n + 1)], n)
    return Analysis(
        title=f"Grid search against the minimizer on {spec.task} ({spec.scale} scale)",
        headline=_headline(spec, answers, n_grid, grid_steps), tables=tables,
        data={"configs": [(w, rel[w], size[w][0]) for w in configs if w in rel],
              "minimizer": points, "heat": heat, "task": spec.task, "seeds": spec.seeds},
        notes=[(f"Every configuration: {spec.base_steps} steps with the {spec.recipe} recipe; "
                f"minimizer: {spec.strategy}, reference {spec.reference}, "
                f"{spec.retrain_steps} retrain steps, {spec.finetune_steps} fine-tune steps.")])


def _headline(spec: Spec, answers: dict, n_grid: int, grid_steps: int) -> list[str]:
    """The issue's sentence, at 0.95 when studied (else the middle threshold)."""
    ts = sorted(answers)
    t = 0.95 if 0.95 in answers else ts[len(ts) // 2]
    grid, mine, y, seeds = answers[t]
    if grid is None:
        return []
    text = (f"At threshold {t:.2f} on {spec.task}: grid search trains {n_grid} configurations "
            f"× {plural(spec.seeds, 'seed')} = {grid_steps:,} steps to find "
            f"{widths_text(grid)}")
    if mine is None:
        return [text + "; the minimizer's results are missing."]
    return [text + f"; the minimizer ({spec.strategy}) finds {widths_text(mine)} in {y:,} steps "
            f"({plural(seeds, 'seed')}, base training included)."]


def draw(analysis: Analysis, folder: Path) -> list[tuple[str, Path]]:
    """The grid against the minimizer: (caption, PNG path); an SVG is written beside it."""
    from selfscale.study.figures import grid_panels

    d = analysis.data
    png = grid_panels(d["configs"], d["minimizer"], d["heat"], Path(folder) / "gridsearch",
                      title=f"{d['task']}: every configuration trained from scratch "
                            f"({plural(d['seeds'], 'seed')}) and the minimizer")
    return [(CAPTION, png)]
