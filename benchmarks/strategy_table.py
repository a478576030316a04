"""Minimize base networks of several seeds with several strategies and thresholds; print a table.

This makes the README's minimality table (thesis 4.3, extended over seeds). Every seed gets its
own base network (trained once with the chosen recipe); each (task, seed, strategy, threshold)
minimizes a copy of it. It is resumable: each result is one JSON file written atomically, and a
finished job is skipped when the script runs again. Jobs run in parallel processes with one torch
thread each. Per cell the table gives the active prunable masks (layers 1-2) as mean and worst
over the seeds, how many seeds end with at most --goal masks, final/base score (mean, worst) and
the training steps the minimization spent (mean).

    python benchmarks/strategy_table.py --out runs/strategy-table --workers 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from selfscale.checkpoint import atomic_write_text
from selfscale.config import MinimizeConfig, RunConfig


def base_run(out: Path, task: str, seed: int, steps: int, recipe: str) -> Path:
    """Train (or reuse) the base network of ``task`` for ``seed``; writes its scores to
    ``base.json`` beside it."""
    import torch

    from selfscale.run import load_run, prepare_data, start_run, train_run

    torch.set_num_threads(1)
    path = out / f"{task}-seed{seed}-base"
    if (path / "state.pt").is_file():
        run = load_run(path)
        if run.state.step >= steps:
            return path
    else:
        cfg = RunConfig.from_dict({"task": {"name": task},
                                   "train": {"recipe": recipe, "steps": steps, "seed": seed,
                                             "eval_every": max(steps // 10, 1), "device": "cpu",
                                             "threads": 1}})
        run = start_run(cfg, path)
    t0 = time.perf_counter()
    train_run(run, prepare_data(run.config))
    last = run.state.history[-1]
    atomic_write_text(path.with_suffix(".json"), json.dumps(
        {"task": task, "seed": seed, "recipe": recipe, "steps": run.state.step,
         "wall_seconds": round(time.perf_counter() - t0, 1),
         **{k: last[k] for k in ("f1", "uiqi", "mae", "mse")}}) + "\n")
    return path


def base_table(out: Path, pairs: list[tuple[str, int]]) -> str:
    """Per task: F1, UIQI (mean and worst over the seeds) and the training wall time."""
    rows = [json.loads((out / f"{t}-seed{s}-base.json").read_text()) for t, s in pairs]
    lines = ["| task | recipe | steps | seeds | F1 mean | F1 worst | UIQI mean | UIQI worst | "
             "wall time per run (1 thread) |", "|---|---|---|---|---|---|---|---|---|"]
    for task in dict.fromkeys(r["task"] for r in rows):
        rs = [r for r in rows if r["task"] == task]
        lines.append(f"| {task} | {rs[0]['recipe']} | {rs[0]['steps']} | {len(rs)} | "
                     f"{statistics.mean(r['f1'] for r in rs):.3f} | "
                     f"{min(r['f1'] for r in rs):.3f} | "
                     f"{statistics.mean(r['uiqi'] for r in rs):.3f} | "
                     f"{min(r['uiqi'] for r in rs):.3f} | "
                     f"{statistics.mean(r['wall_seconds'] for r in rs):.0f} s |")
    return "\n".join(lines)


def one(job: dict) -> dict:
    """Minimize a copy of a base run with one strategy and threshold; returns its summary."""
    import torch

    from selfscale.minimize.session import minimize_run
    from selfscale.run import load_run, prepare_data

    torch.set_num_threads(1)
    result_file = Path(job["result"])
    if result_file.is_file():
        return json.loads(result_file.read_text())
    target = Path(job["target"])
    cfg = MinimizeConfig(strategy=job["strategy"], threshold=job["threshold"],
                         retrain_steps=job["retrain_steps"], finetune_steps=job["finetune_steps"],
                         seed=job["seed"])
    t0 = time.perf_counter()
    resume = (target / "minimize" / "state.pt").is_file()
    run = load_run(target if resume else Path(job["base"]), "cpu")
    res = minimize_run(run, prepare_data(run.config), cfg, out=target, resume=resume)
    row = {**{k: job[k] for k in ("task", "seed", "strategy", "threshold")},
           "wall_seconds": round(time.perf_counter() - t0, 1), **res.summary}
    atomic_write_text(result_file, json.dumps(row) + "\n")
    return row


def table(rows: list[dict], goal: int) -> str:
    lines = ["| task | strategy | threshold | seeds | active masks: mean | worst | seeds with "
             f"≤ {goal} | final/base F1: mean | worst | base F1 (mean) | training steps (mean) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["task"], r["strategy"], r["threshold"]), []).append(r)
    for (task, strategy, threshold), rs in cells.items():
        masks = [r["masks_after"] for r in rs]
        ratio = [r["scores_after"]["f1"] / r["scores_before"]["f1"] for r in rs]
        lines.append(
            f"| {task} | {strategy} | {threshold:.2f} | {len(rs)} | "
            f"{statistics.mean(masks):.1f} | {max(masks)} | {sum(m <= goal for m in masks)} | "
            f"{statistics.mean(ratio):.3f} | {min(ratio):.3f} | "
            f"{statistics.mean(r['scores_before']['f1'] for r in rs):.3f} | "
            f"{statistics.mean(r['steps_trained'] for r in rs):.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/strategy-table"))
    p.add_argument("--tasks", default="sobel")
    p.add_argument("--strategies", default="cosmax,l1,taylor,random,seq")
    p.add_argument("--thresholds", default="0.90,0.95,0.98")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--recipe", default="capacity", help="training recipe of the base networks")
    p.add_argument("--base-steps", type=int, default=None,
                   help="base training steps (default: the recipe's)")
    p.add_argument("--retrain-steps", type=int, default=MinimizeConfig.retrain_steps)
    p.add_argument("--finetune-steps", type=int, default=MinimizeConfig.finetune_steps)
    p.add_argument("--goal", type=int, default=6, help="count seeds with at most this many "
                                                       "active prunable masks")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--bases-only", action="store_true",
                   help="train the base networks and print their scores only")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    steps = args.base_steps or RunConfig.from_dict({"train": {"recipe": args.recipe}}).train.steps
    pairs = [(t, int(s)) for t in args.tasks.split(",") for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        bases = dict(zip(pairs, pool.map(base_run, [args.out] * len(pairs),
                                         [t for t, _ in pairs], [s for _, s in pairs],
                                         [steps] * len(pairs), [args.recipe] * len(pairs))))
        text = base_table(args.out, pairs)
        atomic_write_text(args.out / "bases.md", text + "\n")
        print(text)
        if args.bases_only:
            return
        jobs = [{"task": t, "seed": s, "strategy": st, "threshold": float(th),
                 "base": str(bases[t, s]), "target": str(args.out / f"{t}-seed{s}-{st}-{th}"),
                 "result": str(args.out / f"{t}-seed{s}-{st}-{th}.json"),
                 "retrain_steps": args.retrain_steps, "finetune_steps": args.finetune_steps}
                for t, s in pairs for st in args.strategies.split(",")
                for th in args.thresholds.split(",")]
        rows = list(pool.map(one, jobs))
    text = table(rows, args.goal)
    print()
    atomic_write_text(args.out / "table.md", text + "\n")
    print(text)
    print(f"\n{len(rows)} minimizations, {time.perf_counter() - t0:.0f} s wall time with "
          f"{args.workers} workers")


if __name__ == "__main__":
    main()
