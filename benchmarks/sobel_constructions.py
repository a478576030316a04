"""What the thesis network can hold on sobel, built by hand, and whether training keeps it.

REFERENCE-style constructions of the Sobel magnitude inside the 5/5/1 network (5×5 masks, ReLU
after every layer), scored the way `selfscale evaluate` scores a run (the zero-padded 256² centre
crops of the bundled eval images) and with context (the crop predicted inside its surroundings;
see border_bound.py):

- ``l1`` (widths 4/1/1): layer 1 = ReLU(±gx), ReLU(±gy); layer 2 = |gx| + |gy|; layer 3 scales.
- ``amb`` (4/3/1): layer 2 = u + v, ReLU(u − v), ReLU(v − u) with u = |gx|, v = |gy|, so that
  layer 3 can form alpha·max + beta·min.
- ``five`` (4/5/1): layer 2 = u + v, ReLU(u − t·v), ReLU(v − t·u) for two values of t.

Layer 3's weights are a non-negative least-squares fit of √((u² + v²)/2) on the quarter circle
(analytic: no image is looked at). Then each construction is trained further with the default
(capacity) recipe for ``--steps`` steps at peak learning rates ``--lrs``, from the construction
(Adam fresh, schedule restarted), to see whether training keeps, improves or leaves it.

    python benchmarks/sobel_constructions.py --steps 4000 --lrs 3e-3,3e-4 --out runs/constructions
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import nnls

from selfscale.config import RunConfig
from selfscale.model import FCN
from selfscale.run import prepare_data, start_run, train_run
from selfscale.tasks import SOBEL_COLS, SOBEL_ROWS
from selfscale.train import evaluate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from border_bound import scores_with_context

GX, GY = SOBEL_COLS, SOBEL_ROWS  # the kernels of the sobel task's operator


def layer2_rows(name: str, t: tuple[float, ...] = ()) -> list[tuple[float, float]]:
    """Layer-2 masks as (a, b): ReLU(a·u + b·v)."""
    if name == "l1":
        return [(1.0, 1.0)]
    if name == "amb":
        return [(1.0, 1.0), (1.0, -1.0), (-1.0, 1.0)]
    return [(1.0, 1.0)] + [row for s in t for row in ((1.0, -s), (-s, 1.0))]


def fit_layer3(rows: list[tuple[float, float]], n: int = 2001) -> tuple[np.ndarray, float]:
    """Non-negative weights c with Σ c_j ReLU(a_j u + b_j v) ≈ √((u² + v²)/2) on the unit
    quarter circle, and the largest relative error of the fit."""
    theta = np.linspace(0.0, math.pi / 2, n)
    u, v = np.cos(theta), np.sin(theta)
    feats = np.stack([np.maximum(a * u + b * v, 0.0) for a, b in rows], axis=1)
    target = np.full(n, math.sqrt(0.5))
    c, _ = nnls(feats, target)
    return c, float(np.max(np.abs(feats @ c - target) / target))


def construct(rows: list[tuple[float, float]], c: np.ndarray, kernel: int = 5) -> FCN:
    """The 5/5/1 network holding the construction (unused masks all zero)."""
    model = FCN((5, 5, 1), kernel, 1)
    mid = kernel // 2
    with torch.no_grad():
        for layer in model.layers:
            layer.weight.zero_()
            layer.bias.zero_()
        w1 = model.layers[0].weight
        for k, (kern, sign) in enumerate(((GX, 1), (GX, -1), (GY, 1), (GY, -1))):
            w1[k, 0, mid - 1:mid + 2, mid - 1:mid + 2] = torch.from_numpy(sign * kern)
        w2 = model.layers[1].weight
        for j, (a, b) in enumerate(rows):  # u = m0 + m1, v = m2 + m3 (centre taps)
            w2[j, 0, mid, mid] = w2[j, 1, mid, mid] = a
            w2[j, 2, mid, mid] = w2[j, 3, mid, mid] = b
        w3 = model.layers[2].weight
        for j, cj in enumerate(c):
            w3[0, j, mid, mid] = float(cj)
    return model


def best_t_pair(grid: np.ndarray) -> tuple[tuple[float, float], float]:
    best = ((0.0, 0.0), math.inf)
    for i, s in enumerate(grid):
        for t in grid[i + 1:]:
            _, err = fit_layer3(layer2_rows("five", (s, t)))
            if err < best[1]:
                best = ((float(s), float(t)), err)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4000, help="training steps from each construction (0: none)")
    p.add_argument("--lrs", default="3e-3,3e-4", help="peak learning rates of those trainings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=12,
                   help="crops per training step (default 12: selfscale 0.2.0's default, with "
                        "which the README's table was made)")
    p.add_argument("--out", type=Path, default=Path("runs/constructions"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    config = RunConfig.from_dict({"data": {"batch": args.batch}})
    data = prepare_data(config)
    crop, cpu = config.data.crop, torch.device("cpu")
    ts, _ = best_t_pair(np.round(np.arange(0.05, 1.0, 0.05), 2))
    built = {"l1": layer2_rows("l1"), "amb": layer2_rows("amb"), "five": layer2_rows("five", ts)}
    results = []
    print(f"five: t = {ts}")
    print("| construction | widths | max relative error (analytic) | training | F1 (zero-padded crop) | F1 (with context) | UIQI (zero-padded crop) | UIQI (with context) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rows in built.items():
        c, err = fit_layer3(rows)
        model = construct(rows, c)
        widths = f"4/{len(rows)}/1"
        variants = [("none", model)]
        for lr in [float(x) for x in args.lrs.split(",") if x] if args.steps else []:
            out = args.out / f"{name}-lr{lr:g}"
            cfg = dataclasses.replace(config, train=dataclasses.replace(
                config.train, steps=args.steps, lr=lr, seed=args.seed, threads=1,
                eval_every=args.steps))
            run = start_run(cfg, out)
            run.state.model.load_state_dict(construct(rows, c).state_dict())
            run.meta["init_redraws"] = 0  # the construction is alive; keep it
            train_run(run, data)
            variants.append((f"{args.steps} steps, peak lr {lr:g}", run.state.model))
        for how, net in variants:
            plain = evaluate(net, data.eval, crop, cpu)
            ctx = scores_with_context(net, data.eval, crop)
            results.append({"construction": name, "widths": widths, "max_rel_error": err,
                            "training": how, "f1": plain["f1"], "f1_context": ctx["f1"],
                            "uiqi": plain["uiqi"], "uiqi_context": ctx["uiqi"]})
            print(f"| {name} | {widths} | {err:.4f} | {how} | {plain['f1']:.4f} | {ctx['f1']:.4f} | "
                  f"{plain['uiqi']:.4f} | {ctx['uiqi']:.4f} |", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "constructions.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
