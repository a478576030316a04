"""Which score should judge a removal? Short-retrain rules measured against a long retrain.

The minimizer cuts a mask, retrains R steps and compares the score with a reference. The
question (issue "fair verdicts") is which comparison predicts what the cut network would reach
with much more training. For every prunable mask of each base network, one at a time:

* the mask is disabled and frozen (the minimizer's default mode), Adam reset, and the network
  retrained R steps with the run's recipe (the schedule restarted), evaluated ``JUDGE_EVALS``
  times; and, from the same cut, retrained L steps (the long run, ``--long``);
* the unchanged base is retrained R and L steps the same way, on the same batches (its clone
  has the same batch generator): the paired references.

Rules, each a ratio of F1 scores (the minimizer keeps a cut when ratio ≥ threshold):

* ``final``    cut after R / base            (selfscale's default, the thesis's fixed mode)
* ``best``     best of the R-retrain's evaluations / base   (``--judge best``)
* ``paired``   cut after R / unchanged base retrained R on the same batches
* truth        cut after L / unchanged base retrained L

Output: per rule, the Spearman correlation with the truth, the mean absolute error, and the
share of keep/step-back decisions equal to the truth's at thresholds 0.90, 0.95 and 0.98.
Jobs (one per base, mask and length) run in processes with one torch thread; results are JSON
files under ``OUT/jobs/`` (resumable; the long runs serve every ``--retrain``), the table goes
to ``OUT/judge.md``.

    python benchmarks/judge_rule.py --base runs/study-laptop/bases/train-5x5x1-s0 \\
        runs/study-laptop/bases/train-5x5x1-s1 --retrain 400 --long 4000 --out runs/judge
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

THRESHOLDS = (0.90, 0.95, 0.98)
RULES = ("final", "best", "paired")


def run_job(base: str, mask: tuple[int, int] | None, steps: int) -> dict[str, Any]:
    """One cut (or the unchanged base when ``mask`` is None) retrained ``steps`` steps: F1 at the
    end (``final``) and the best of its ``JUDGE_EVALS`` evaluations (``best``)."""
    import torch

    from selfscale.minimize.loop import clone_state, retrain as retrain_fn
    from selfscale.run import load_run, pin_threads, prepare_data

    torch.set_num_threads(1)
    pin_threads(1)
    run = load_run(Path(base))
    data, spec = prepare_data(run.config), run.spec()
    state = clone_state(run.state)
    if mask is not None:
        state.model.set_enabled(*mask, False)
        state.model.set_frozen(*mask, True)
    state.reset_optimizer()
    start = state.step
    best = retrain_fn(state, steps, spec, data, judge="best", metric="f1")
    final = [r for r in state.history if r["step"] == start + steps][0]
    return {"final": final["f1"], "best": best["f1"]}


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def analyse(jobs: list[dict[str, Any]], base_f1: dict[str, float]) -> list[dict[str, Any]]:
    """Per rule: Spearman with the truth, mean |rule − truth|, decision agreement by threshold."""
    ref = {j["base"]: j for j in jobs if j["mask"] is None}
    cuts = [j for j in jobs if j["mask"] is not None and j["base"] in ref]
    truth = [c["long"]["final"] / ref[c["base"]]["long"]["final"] for c in cuts]
    ratios = {
        "final": [c["short"]["final"] / base_f1[c["base"]] for c in cuts],
        "best": [c["short"]["best"] / base_f1[c["base"]] for c in cuts],
        "paired": [c["short"]["final"] / ref[c["base"]]["short"]["final"] for c in cuts],
    }
    rows = []
    for rule in RULES:
        r = ratios[rule]
        row = {"rule": rule, "cuts": len(cuts), "spearman": spearman(r, truth),
               "mean_abs_error": sum(abs(x - t) for x, t in zip(r, truth)) / len(cuts),
               "mean_ratio": sum(r) / len(r), "mean_truth": sum(truth) / len(truth)}
        for th in THRESHOLDS:
            row[f"agree@{th:g}"] = sum((x >= th) == (t >= th) for x, t in zip(r, truth)) / len(r)
            row[f"kept@{th:g}"] = sum(x >= th for x in r)
            row[f"truth_kept@{th:g}"] = sum(t >= th for t in truth)
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = ["rule", "cuts", "Spearman with truth", "mean |ratio − truth|", "mean ratio",
            "mean truth", *[f"same decision at {t:g} (kept: rule / truth)" for t in THRESHOLDS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["rule"], str(r["cuts"]), f"{r['spearman']:.3f}",
                 f"{r['mean_abs_error']:.3f}", f"{r['mean_ratio']:.3f}", f"{r['mean_truth']:.3f}"]
        cells += [f"{r[f'agree@{t:g}']:.2f} ({r[f'kept@{t:g}']} / {r[f'truth_kept@{t:g}']})"
                  for t in THRESHOLDS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", nargs="+", required=True, metavar="RUN_DIR",
                   help="trained base runs (selfscale train or a study's bases/)")
    p.add_argument("--retrain", type=int, default=400, metavar="R", help="short retrain steps")
    p.add_argument("--long", type=int, default=4000, metavar="L", help="long retrain steps")
    p.add_argument("--workers", type=int, default=2, metavar="N")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    a = p.parse_args(argv)
    from selfscale.checkpoint import atomic_write_text
    from selfscale.minimize.alter import prunable_masks
    from selfscale.run import load_run, prepare_data
    from selfscale.train import evaluate

    if a.retrain < 4 or a.long <= a.retrain:
        p.error("--retrain must be at least 4 and --long above it")
    for b in a.base:
        if not (Path(b) / "state.pt").is_file():
            p.error(f"--base: {b} is not a trained run directory (no state.pt)")
    jobs_dir = a.out / "jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    todo, base_f1 = [], {}
    for b in a.base:
        run = load_run(Path(b))
        scores = evaluate(run.state.model, prepare_data(run.config).eval, run.config.data.crop,
                          run.device)
        base_f1[b] = scores["f1"]
        for mask in [None, *prunable_masks(run.state.model)]:
            name = f"{Path(b).name}-{'ref' if mask is None else 'l%dm%d' % mask}"
            todo.append((name, b, mask))
    # one file per (base, mask, length): the long runs serve every --retrain length
    parts: dict[tuple[str, int], dict[str, Any]] = {}
    pending = []
    for name, b, mask in todo:
        for steps in (a.retrain, a.long):
            f = jobs_dir / f"{name}-{steps}.json"
            if f.is_file():
                parts[name, steps] = json.loads(f.read_text())
            else:
                pending.append((name, b, mask, steps, f))
    with ProcessPoolExecutor(a.workers) as pool:
        futures = {pool.submit(run_job, b, mask, steps): (name, steps, f)
                   for name, b, mask, steps, f in pending}
        for i, fut in enumerate(as_completed(futures), 1):
            name, steps, f = futures[fut]
            parts[name, steps] = fut.result()
            atomic_write_text(f, json.dumps(parts[name, steps]) + "\n")
            print(f"[{i}/{len(pending)}] {name} {steps} steps", file=sys.stderr, flush=True)
    results = {name: {"base": b, "mask": mask, "short": parts[name, a.retrain],
                      "long": parts[name, a.long]} for name, b, mask in todo}
    rows = analyse(list(results.values()), base_f1)
    text = (f"R = {a.retrain} retrain steps, truth: L = {a.long}; bases: "
            + ", ".join(f"{Path(b).name} (F1 {base_f1[b]:.4f})" for b in a.base) + "\n\n"
            + table(rows))
    atomic_write_text(a.out / "judge.md", text)
    atomic_write_text(a.out / "judge.json", json.dumps({"rows": rows, "base_f1": base_f1,
                                                         "jobs": results}, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
