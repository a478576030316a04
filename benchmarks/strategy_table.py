"""Minimize one base network per task with every strategy at several thresholds; print a table.

This makes the README's strategy table (thesis 4.3, extended). It is resumable: each result is
one JSON file written atomically, and a finished (task, strategy, threshold) is skipped when the
script runs again. Jobs run in parallel processes with one torch thread each.

    python benchmarks/strategy_table.py --out runs/strategy-table --workers 2
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from selfscale.checkpoint import atomic_write_text
from selfscale.config import (DataConfig, MinimizeConfig, ModelConfig, RunConfig, TaskConfig,
                              TrainConfig)

THESIS = ("cosmax", "random", "seq")
BEYOND = ("l1", "taylor", "fpgm", "oracle")


def base_run(out: Path, task: str, steps: int, train_crop: int, seed: int) -> Path:
    """Train (or reuse) the base network of ``task``."""
    import torch

    from selfscale.run import load_run, prepare_data, start_run, train_run

    torch.set_num_threads(1)
    path = out / f"{task}-base"
    if (path / "state.pt").is_file():
        run = load_run(path)
        if run.state.step >= steps:
            return path
    else:
        cfg = RunConfig(data=DataConfig(train_crop=train_crop), task=TaskConfig(name=task),
                        model=ModelConfig(),
                        train=TrainConfig(steps=steps, eval_every=1000, seed=seed, device="cpu",
                                          threads=1))
        run = start_run(cfg, path)
    train_run(run, prepare_data(run.config))
    return path


def one(job: dict) -> dict:
    """Minimize a copy of the base run with one strategy and threshold; returns its summary."""
    import torch

    from selfscale.minimize.session import minimize_run
    from selfscale.run import load_run, prepare_data

    torch.set_num_threads(1)
    result_file = Path(job["result"])
    if result_file.is_file():
        return json.loads(result_file.read_text())
    target = Path(job["target"])
    cfg = MinimizeConfig(strategy=job["strategy"], threshold=job["threshold"],
                         retrain_steps=job["retrain_steps"], seed=job["seed"])
    t0 = time.perf_counter()
    resume = (target / "minimize" / "state.pt").is_file()
    run = load_run(target if resume else Path(job["base"]), "cpu")
    res = minimize_run(run, prepare_data(run.config), cfg, out=target, resume=resume)
    row = {"task": job["task"], "strategy": job["strategy"], "threshold": job["threshold"],
           "wall_seconds": round(time.perf_counter() - t0, 1), **res.summary}
    atomic_write_text(result_file, json.dumps(row) + "\n")
    return row


def table(rows: list[dict]) -> str:
    lines = ["| task | strategy | threshold | active masks per layer | layers | prunable masks "
             "left | F1 before → after | retrain steps | wall time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['strategy']} | {r['threshold']:.2f} | "
            f"{'/'.join(map(str, r['widths_after']))} | {r['layers_after']} | "
            f"{r['masks_after']} of {r['masks_before']} | "
            f"{r['scores_before']['f1']:.3f} → {r['scores_after']['f1']:.3f} | "
            f"{r['steps_trained']} | {r['wall_seconds']:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/strategy-table"))
    p.add_argument("--tasks", default="sobel,canny")
    p.add_argument("--strategies", default=",".join(THESIS + BEYOND))
    p.add_argument("--thresholds", default="0.90,0.95,0.98")
    p.add_argument("--base-steps", type=int, default=10_000)
    p.add_argument("--train-crop", type=int, default=128)
    p.add_argument("--retrain-steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tasks = args.tasks.split(",")
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        bases = dict(zip(tasks, pool.map(base_run, [args.out] * len(tasks), tasks,
                                         [args.base_steps] * len(tasks),
                                         [args.train_crop] * len(tasks),
                                         [args.seed] * len(tasks))))
        jobs = [{"task": t, "strategy": s, "threshold": float(th), "base": str(bases[t]),
                 "target": str(args.out / f"{t}-{s}-{th}"),
                 "result": str(args.out / f"{t}-{s}-{th}.json"),
                 "retrain_steps": args.retrain_steps, "seed": args.seed}
                for t in tasks for s in args.strategies.split(",")
                for th in args.thresholds.split(",")]
        rows = list(pool.map(one, jobs))
    text = table(rows)
    atomic_write_text(args.out / "table.md", text + "\n")
    print(text)
    print(f"\n{len(rows)} minimizations, {time.perf_counter() - t0:.0f} s wall time with "
          f"{args.workers} workers")


if __name__ == "__main__":
    main()
