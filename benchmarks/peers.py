"""selfscale's minimizer against one-shot structured pruning by Torch-Pruning, at equal widths and
an equal training budget.

What it measures. For each (task, seed, threshold), selfscale minimizes a copy of a trained base
network (``minimize_run``: strategy, threshold, retrains, fine-tune). Its result fixes two numbers:
the widths it found and N, the training steps it spent after the base (every retrain and
oracle trial plus the fine-tune: ``summary["steps_trained"]``). From the SAME base network,
every peer then gets exactly those widths and N training steps:

* ``tp-taylor``, ``tp-l1``, ``tp-random``: Torch-Pruning (VainF/Torch-Pruning) prunes a plain
  ``nn.Sequential`` copy of the base in one shot (one ``pruner.step()``) to those widths, with
  its importance criteria ``TaylorImportance`` (|w·∂L/∂w|, gradients of the run's loss on
  ``TAYLOR_CROPS`` seeded training crops), ``MagnitudeImportance(p=1)`` and
  ``RandomImportance``, all with Torch-Pruning's default group reduction (a channel's score
  pools its own filter and the next layer's matching input weights). Only hidden layers are
  pruned: never the input, never the output layer (width 1).
* ``cut-at-once``: selfscale's own choice (the masks the minimizer kept), removed from the base
  all at once.
* ``cut-at-once-lineage``: the same cut, fine-tuned only for the steps the minimized network
  itself went through after the base (its kept retrains and its fine-tune, ``lineage_steps``;
  not the steps of stepped-back trials). Against ``selfscale`` this measures the path alone:
  the same channels and training steps, a cut at once and one schedule against one mask at a
  time, each followed by its own retrain.
* ``scratch``: the same widths, freshly initialized and trained with the run's recipe. Its budget
  (``--scratch-budget``) is ``total`` by default, base steps + N: everything the selfscale network
  (and every pruned peer) has been trained in all; ``minimize`` gives it only N.

The pruned peers and cut-at-once are then fine-tuned by selfscale's own loop
(``selfscale.train.train``) with the run's recipe for N steps in one go (the learning-rate
schedule restarted for N, as the minimizer's fine-tune does; same batch seed for every peer), so
only the choice of channels differs. Scores are selfscale's: mean soft F1, UIQI, MAE on the
held-out eval crops. selfscale's own N steps are spread over many short retrains and a
fine-tune; the peers get them as one schedule.

If the minimizer removed a whole hidden layer, Torch-Pruning (channels only) and cut-at-once
have no equivalent; those cells read "–" and the JSON says why.

Jobs run in processes with one torch thread each and are resumable: each job's result is one
JSON file written atomically (``OUT/jobs/``), finished jobs are skipped, an interrupted
minimization or from-scratch run continues from its checkpoint. Results: ``OUT/peers.md`` (the
table and one summary line per task and threshold) and ``OUT/peers.json``.

Needs Torch-Pruning (``pip install 'selfscale[bench]'``); selfscale itself never does.

    # bases trained here (the capacity recipe, 40 000 steps each), 3 seeds, 3 thresholds
    python benchmarks/peers.py --task sobel --seeds 0,1,2 --thresholds 0.90,0.95,0.98 \\
        --strategy l1 --out runs/peers --workers 2
    # or from existing runs
    python benchmarks/peers.py --base runs/sobel runs/sobel-2 --out runs/peers
    # smoke test (about a minute on 2 cores)
    python benchmarks/peers.py --task sobel --seeds 0 --base-steps 200 --retrain-steps 20 \\
        --finetune-steps 20 --thresholds 0.9 --out /tmp/peers-smoke
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from selfscale.checkpoint import atomic_write_text
from selfscale.config import MinimizeConfig, RunConfig, merge_sections, minimize_config_for

TP_MISSING = "benchmarks/peers.py needs Torch-Pruning: pip install 'selfscale[bench]'"
TP_METHODS = {"tp-taylor": "TaylorImportance", "tp-l1": "MagnitudeImportance(p=1)",
              "tp-random": "RandomImportance"}
"""Torch-Pruning's importance criteria compared, by the method name used in files and tables."""
METHODS = ("selfscale", *TP_METHODS, "cut-at-once", "cut-at-once-lineage", "scratch")
PEERS = METHODS[1:]
TAYLOR_CROPS = 32
"""Training crops (the run's training crop size, seeded) whose loss gradient scores Taylor."""
SCRATCH_BUDGETS = ("total", "minimize")


def require_torch_pruning():
    """The ``torch_pruning`` module, or exit with one line saying how to install it."""
    try:
        import torch_pruning
    except ImportError:
        print(f"peers.py: error: {TP_MISSING}", file=sys.stderr)
        sys.exit(2)
    return torch_pruning


# --- pure helpers -------------------------------------------------------------------------------
def pruning_ratio(before: int, after: int) -> float:
    """The ratio that makes Torch-Pruning keep exactly ``after`` of ``before`` channels.

    Its local pruner removes ``before − int(before·(1 − ratio))`` channels, so a ratio of
    ``(before − after − ½)/before`` puts ``before·(1 − ratio)`` at ``after + ½``, half a channel
    clear of the floor's edge (float error cannot flip it); 0 when nothing is removed.
    """
    if not 1 <= after <= before:
        raise ValueError(f"cannot prune {before} channels to {after}")
    return 0.0 if after == before else (before - after - 0.5) / before


def kept_channels(before: list, after: list) -> list[list[bool]]:
    """Which of the original output channels survive, per layer, found from the weights alone
    (``before``/``after``: each layer's weight tensors (out, in, k, k) before and after pruning).
    A kept filter of layer i equals its original restricted to layer i−1's kept channels; the
    input channels of layer 1 are never pruned."""
    import torch

    matrix, keep_in = [], list(range(before[0].shape[1]))
    for w0, w1 in zip(before, after):
        rows = w0[:, keep_in]
        kept: list[int] = []
        for f in w1:
            match = [j for j in range(len(rows)) if j not in kept and torch.equal(rows[j], f)]
            if not match:
                raise ValueError("a pruned filter matches no original filter")
            kept.append(match[0])
        matrix.append([j in kept for j in range(len(w0))])
        keep_in = sorted(kept)
    return matrix


def widths_text(widths: list[int]) -> str:
    return "/".join(map(str, widths))


def score_text(row: dict[str, Any] | None) -> str:
    """A cell's F1; "–" for a skipped peer, and "(=)" after a Torch-Pruning F1 whose criterion
    kept exactly selfscale's channels (so it is cut-at-once's network)."""
    if row is None:
        return "?"
    if row.get("skipped"):
        return "–"
    same = row["method"] in TP_METHODS and row.get("same_channels")
    return f"{row['f1']:.3f}" + (" (=)" if same else "")


def lineage_text(by: dict[str, dict[str, Any]]) -> str:
    row = by.get("cut-at-once-lineage")
    return "?" if row is None or "steps" not in row else str(row["steps"])


def lineage_steps(mdir: Path) -> int:
    """Training steps the minimized network itself went through after the base: the retrains of
    the changes it kept and its fine-tune, unless that was undone (``mdir``: a run's
    ``minimize/`` folder). Stepped-back trials, paired and oracle retrains are not in it."""
    log = [json.loads(line) for line in (mdir / "decisions.jsonl").read_text().splitlines()]
    s = json.loads((mdir / "summary.json").read_text())
    return (sum(d["steps_trained"] for d in log if d["kept"])
            + (s["finetune_steps"] if s["finetune_kept"] is not False else 0))


# --- networks -----------------------------------------------------------------------------------
def plain_network(model):
    """The network's enabled masks as a plain ``nn.Sequential`` of Conv2d + ReLU (CPU, float32),
    the form Torch-Pruning traces."""
    import torch

    from selfscale.compact import architecture, compact_model, plain_torch_module

    compact = compact_model(model).to("cpu", torch.float32)
    state = {f"layers.{i}.{name}": getattr(layer, name).detach().clone()
             for i, layer in enumerate(compact.layers) for name in ("weight", "bias")}
    return plain_torch_module(architecture(compact), state).train()


def fcn_from_plain(net, kernel: int, in_channels: int):
    """A selfscale FCN (every switch on) holding the weights of a plain Conv2d + ReLU stack."""
    import torch
    from torch import nn

    from selfscale.model import FCN

    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    with torch.random.fork_rng(devices=[]):  # FCN's default init must not move the global RNG
        model = FCN([c.out_channels for c in convs], kernel, in_channels)
    with torch.no_grad():
        for conv, layer in zip(convs, model.layers):
            layer.weight.copy_(conv.weight)
            layer.bias.copy_(conv.bias)
    return model


def tp_prune(model, widths: list[int], method: str, batch, loss_fn,
             seed: int) -> tuple[Any, list[list[bool]]]:
    """``model`` pruned by Torch-Pruning in one shot to exactly ``widths`` (every layer's; the
    output layer's must stay as it is) with the criterion of ``method``, hidden layers only;
    ``batch`` = (inputs, targets) for Taylor's gradients. Returns the pruned FCN and which
    channels of the base it kept (a mask matrix)."""
    import torch
    from torch import nn

    tp = require_torch_pruning()
    net = plain_network(model)
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    before = [c.weight.detach().clone() for c in convs]
    importance = {"tp-taylor": lambda: tp.importance.TaylorImportance(),
                  "tp-l1": lambda: tp.importance.MagnitudeImportance(p=1),
                  "tp-random": lambda: tp.importance.RandomImportance()}[method]()
    if method == "tp-taylor":
        x, y = batch
        net.zero_grad()
        loss_fn(net(x), y).backward()
    if len(widths) != len(convs) or widths[-1] != convs[-1].out_channels:
        raise ValueError(f"widths {widths} do not fit the network's {len(convs)} layers")
    ratios = {conv: pruning_ratio(conv.out_channels, w)
              for conv, w in zip(convs[:-1], widths[:-1])}
    pruner_cls = getattr(tp.pruner, "BasePruner", None) or tp.pruner.MetaPruner
    torch.manual_seed(seed)  # RandomImportance draws from the global generator
    pruner = pruner_cls(net, torch.zeros(1, model.in_channels, 16, 16), importance,
                        pruning_ratio=0.0, pruning_ratio_dict=ratios, ignored_layers=[convs[-1]])
    pruner.step()
    got = [c.out_channels for c in convs]
    if got != list(widths):
        raise RuntimeError(f"Torch-Pruning ({method}) left widths {got}, expected {widths}")
    matrix = kept_channels(before, [c.weight.detach() for c in convs])
    return fcn_from_plain(net, model.kernel, model.in_channels), matrix


def cut_at_once(model, matrix: list[list[bool]]):
    """The base with every mask the minimizer removed switched off at once, compacted."""
    from selfscale.compact import compact_model

    cut = copy.deepcopy(model)
    for layer, row in enumerate(matrix):
        for mask, on in enumerate(row):
            if not on:
                cut.set_enabled(layer, mask, False)
    return compact_model(cut)


def finetune_peer(model, run, data, steps: int, seed: int) -> dict[str, Any]:
    """Train ``model`` ``steps`` steps with the run's recipe, exactly as the minimizer's fine-tune
    does (schedule restarted for the length, ten evaluations, fresh Adam); final scores."""
    from selfscale.train import evaluate, is_dead, new_state, train

    spec = run.spec()
    state = new_state(model, run.config.train.lr, seed, spec.device)
    ft = dataclasses.replace(spec.for_retrain(0, steps), eval_every=max(steps // 10, 1))
    train(state, data.train, data.eval, ft, until_step=steps)
    scores = evaluate(state.model, data.eval, spec.eval_crop, spec.device)
    scores.pop("n_images")
    return {**scores, "dead": is_dead(state.model, data.eval, spec.eval_crop, spec.device)}


# --- jobs (each runs in a worker process) ------------------------------------------------------
def _finished(result: Path) -> dict[str, Any] | None:
    return json.loads(result.read_text()) if result.is_file() else None


def base_job(out: Path, task: str, seed: int, steps: int | None, recipe: str | None,
             extra: dict[str, Any]) -> str:
    """Train (or finish, or reuse) the base network of ``task`` for ``seed``; its directory."""
    import torch

    from selfscale.run import load_run, prepare_data, start_run, train_run, with_steps

    torch.set_num_threads(1)
    path = out / f"{task}-seed{seed}-base"
    if (path / "state.pt").is_file():
        run = load_run(path)
        if steps is not None:
            with_steps(run, steps)
    else:
        given = {"task": {"name": task}, "train": {"seed": seed, "device": "cpu", "threads": 1}}
        if recipe is not None:
            given["train"]["recipe"] = recipe
        if steps is not None:
            given["train"] |= {"steps": steps, "eval_every": max(steps // 10, 1)}
        run = start_run(RunConfig.from_dict(merge_sections(extra, given)), path)
    if run.state.step < run.config.train.steps:
        train_run(run, prepare_data(run.config))
    return str(path)


def minimize_job(job: dict[str, Any]) -> dict[str, Any]:
    """Minimize a copy of the base; the row of method 'selfscale' (with the summary peers need)."""
    import torch

    from selfscale.minimize.session import minimize_run
    from selfscale.run import load_run, prepare_data

    torch.set_num_threads(1)
    result = Path(job["result"])
    if (done := _finished(result)) is not None:
        return done
    target = Path(job["target"])
    resume = (target / "minimize" / "state.pt").is_file()
    if not resume and target.exists():  # a copy this script began but never got to save in
        shutil.rmtree(target)
    run = load_run(target if resume else Path(job["base"]), job["device"])
    given = {k: job[k] for k in ("strategy", "threshold", "seed", "retrain_steps",
                                 "finetune_steps") if job[k] is not None}
    cfg = minimize_config_for(run.config.train.recipe, given)  # lengths: the base's recipe's
    t0 = time.perf_counter()
    s = minimize_run(run, prepare_data(run.config), cfg, out=target, resume=resume).summary
    row = {**_key(job), "method": "selfscale", "widths": s["widths_after"],
           "params": s["parameters_after"], "steps": s["steps_trained"],
           **{k: s["scores_after"][k] for k in ("f1", "uiqi", "mae", "mse")},
           "base_f1": s["scores_before"]["f1"], "base_steps": job["base_steps"],
           "layers_removed": s["layers_before"] - s["layers_after"],
           "mask_matrix": s["mask_matrix"], "decisions": s["decisions"],
           "wall_seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_text(result, json.dumps(row) + "\n")
    return row


def peer_job(job: dict[str, Any]) -> dict[str, Any]:
    """One peer of one minimization: prune (or cut, or initialize) to its widths, then train."""
    import numpy as np
    import torch

    from selfscale.crops import sample_batch
    from selfscale.metrics import LOSSES
    from selfscale.model import parameter_count
    from selfscale.run import load_run, prepare_data, start_run, train_run
    from selfscale.train import as_input, evaluate, is_dead

    torch.set_num_threads(1)
    result = Path(job["result"])
    if (done := _finished(result)) is not None:
        return done
    mini, method = job["minimized"], job["method"]
    widths, steps = mini["widths"], mini["steps"]
    row = {**_key(job), "method": method, "widths": widths}
    if mini["layers_removed"] and method != "scratch":
        row["skipped"] = ("the minimizer removed a hidden layer; Torch-Pruning and cut-at-once "
                          "remove channels only")
        atomic_write_text(result, json.dumps(row) + "\n")
        return row
    t0 = time.perf_counter()
    run = load_run(Path(job["base"]), job["device"])
    data = prepare_data(run.config)
    cfg = run.config
    if method == "scratch":
        budget = steps + (mini["base_steps"] if job["scratch_budget"] == "total" else 0)
        path = Path(job["target"])
        if (path / "state.pt").is_file():
            scratch = load_run(path, job["device"])
        else:
            scratch = start_run(dataclasses.replace(
                cfg, model=dataclasses.replace(cfg.model, widths=tuple(widths)),
                train=dataclasses.replace(cfg.train, steps=budget, threads=1,
                                          device=job["device"])), path)
        train_run(scratch, data)
        spec = scratch.spec()
        scores = evaluate(scratch.state.model, data.eval, spec.eval_crop, spec.device)
        scores.pop("n_images")
        scores["dead"] = is_dead(scratch.state.model, data.eval, spec.eval_crop, spec.device)
        steps = budget
    else:
        base = run.state.model
        if method.startswith("cut-at-once"):
            model, matrix = cut_at_once(base, mini["mask_matrix"]), mini["mask_matrix"]
            if method == "cut-at-once-lineage":
                steps = lineage_steps(Path(job["minimized_dir"]) / "minimize")
        else:
            spec = run.spec()
            x, y = sample_batch(data.train, np.random.default_rng([job["seed"], 5]),
                                TAYLOR_CROPS, spec.train_crop, False)
            batch = (as_input(x, torch.device("cpu")), as_input(y, torch.device("cpu")))
            model, matrix = tp_prune(base, widths, method, batch, LOSSES[spec.loss],
                                     job["seed"])
        if list(model.widths) != list(widths):
            raise RuntimeError(f"{method}: widths {list(model.widths)}, expected {widths}")
        scores = finetune_peer(model, run, data, steps, job["seed"])
        scores |= {"mask_matrix": matrix, "same_channels": matrix == mini["mask_matrix"]}
    row |= {"params": parameter_count(widths, cfg.model.kernel, cfg.model.in_channels),
            "steps": steps, **scores, "wall_seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_text(result, json.dumps(row) + "\n")
    return row


def _key(job: dict[str, Any]) -> dict[str, Any]:
    return {k: job[k] for k in ("task", "seed", "strategy", "threshold")}


# --- tables -------------------------------------------------------------------------------------
TABLE_HEAD = ("| task | seed | threshold | selfscale widths | selfscale F1 | TP Taylor F1 | "
              "TP L1 F1 | TP random F1 | selfscale choice cut at once F1 | the same, lineage "
              "steps F1 | from scratch F1 | total steps | lineage steps |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def group_rows(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, dict[str, Any]]]:
    """{(task, seed, threshold): {method: row}} in the order the rows came."""
    cells: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["task"], r["seed"], r["threshold"]), {})[r["method"]] = r
    return cells


def table(rows: list[dict[str, Any]]) -> str:
    """One line per (task, seed, threshold): the final eval F1 of every method."""
    lines = [TABLE_HEAD]
    for (task, seed, threshold), by in group_rows(rows).items():
        own = by["selfscale"]
        lines.append(f"| {task} | {seed} | {threshold:.2f} | {widths_text(own['widths'])} | "
                     + " | ".join(score_text(by.get(m)) for m in METHODS)
                     + f" | {own['steps']} | {lineage_text(by)} |")
    return "\n".join(lines)


def _scored(by: dict[str, dict[str, Any]], *methods: str) -> bool:
    """Whether every one of ``methods`` has a score (a result that was not skipped)."""
    return all(m in by and not by[m].get("skipped") for m in methods)


def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per task and threshold: mean F1 of every method over the seeds where selfscale and every
    Torch-Pruning variant have a score (so all means cover the same seeds), and whether
    selfscale's mean is at least the best variant's (and in how many of those seeds it is)."""
    per: dict[tuple, list[dict[str, dict[str, Any]]]] = {}
    for (task, _, threshold), by in group_rows(rows).items():
        per.setdefault((task, threshold), []).append(by)
    lines = []
    for (task, threshold), seeds in per.items():
        paired = [by for by in seeds if _scored(by, "selfscale", *TP_METHODS)]
        if not paired:
            own = [by["selfscale"]["f1"] for by in seeds if _scored(by, "selfscale")]
            text = f"selfscale {statistics.mean(own):.3f}" if own else "no result"
            lines.append(f"- {task} @ {threshold:.2f}, mean F1 over {len(own)} seed(s): {text}. "
                         "No Torch-Pruning result to compare")
            continue
        means = {m: statistics.mean(by[m]["f1"] for by in paired) for m in METHODS
                 if all(_scored(by, m) for by in paired)}
        text = ", ".join(f"{m} {v:.3f}" for m, v in means.items())
        best = max(TP_METHODS, key=means.get)
        wins = sum(1 for by in paired
                   if by["selfscale"]["f1"] >= max(by[m]["f1"] for m in TP_METHODS))
        of = f" of {len(seeds)}" if len(paired) < len(seeds) else ""
        lines.append(f"- {task} @ {threshold:.2f}, mean F1 over {len(paired)}{of} seed(s): {text}. "
                     f"selfscale ≥ best Torch-Pruning ({best} {means[best]:.3f}): "
                     f"{'yes' if means['selfscale'] >= means[best] else 'no'}; "
                     f"per seed {wins}/{len(paired)}")
    return lines


def report(rows: list[dict[str, Any]], scratch_budget: str) -> str:
    scratch = ("the base's steps + total steps" if scratch_budget == "total"
               else "total steps")
    note = ("Total steps: training steps the minimization spent after the base (retrains, "
            "trials, fine-tune); every pruned peer and cut-at-once is fine-tuned for as many "
            "from the same base. Lineage steps: those the minimized network itself went "
            "through (kept retrains and fine-tune); 'the same, lineage steps' is selfscale's "
            "choice cut at once and trained that long. From scratch trains the same widths for "
            f"{scratch}. (=): the Torch-Pruning criterion kept exactly the channels selfscale "
            "kept.")
    return "\n".join([table(rows), "", note, "", *summary_lines(rows)])


# --- the command ----------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--base", type=Path, nargs="+", metavar="RUN_DIR",
                     help="trained selfscale run(s) to start from (task and seed from each)")
    src.add_argument("--task", help="train base networks of this task here (with --seeds)")
    p.add_argument("--seeds", default="0,1,2", help="with --task: one base network per seed")
    p.add_argument("--base-steps", type=int, default=None,
                   help="with --task: base training steps (default: the recipe's)")
    p.add_argument("--recipe", default=None,
                   help="with --task: the bases' recipe (default: --config's, else capacity)")
    p.add_argument("--config", type=Path, default=None,
                   help="with --task: a TOML file of [data] [model] [train] values for the bases "
                        "(the format of a run's config.toml); the flags above override it")
    p.add_argument("--strategy", default=MinimizeConfig.strategy)
    p.add_argument("--thresholds", default="0.90,0.95,0.98")
    p.add_argument("--retrain-steps", type=int, default=None,
                   help="default: selfscale minimize's for the base's recipe (capacity 7000, "
                        "thesis 2000)")
    p.add_argument("--finetune-steps", type=int, default=None,
                   help="default: selfscale minimize's for the base's recipe (capacity 17500, "
                        "thesis 5000)")
    p.add_argument("--scratch-budget", choices=SCRATCH_BUDGETS, default="total",
                   help="from-scratch training steps: total = base steps + the minimization's "
                        "steps (all the selfscale network got); minimize = the latter only")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", type=Path, default=Path("runs/peers"))
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    require_torch_pruning()  # fail before any work
    from selfscale.errors import SelfscaleError

    try:
        thresholds = [float(t) for t in args.thresholds.split(",")]
        for t in thresholds:  # validate every flag of the minimization up front
            MinimizeConfig(strategy=args.strategy, threshold=t,
                           **{k: v for k, v in (("retrain_steps", args.retrain_steps),
                                                ("finetune_steps", args.finetune_steps))
                              if v is not None})
        extra = {}
        if args.config is not None:
            from selfscale.tomlfile import load_toml
            extra = load_toml(args.config)
        benchmark(args, thresholds, extra)
    except (SelfscaleError, ValueError) as exc:
        print(f"peers.py: error: {exc}", file=sys.stderr)
        sys.exit(2)


def benchmark(args: argparse.Namespace, thresholds: list[float], extra: dict[str, Any]) -> None:
    """Bases → minimizations → peers (each stage in the pool) → the table, printed and saved."""
    from selfscale.run import load_train_state, read_run_config

    out: Path = args.out
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        if args.base:
            bases = [str(b) for b in args.base]
        else:
            seeds = [int(s) for s in args.seeds.split(",")]
            bases = list(pool.map(base_job, [out] * len(seeds), [args.task] * len(seeds), seeds,
                                  [args.base_steps] * len(seeds), [args.recipe] * len(seeds),
                                  [extra] * len(seeds)))
        jobs = []
        for b in bases:
            cfg, _ = read_run_config(Path(b))
            task, seed = cfg.task.name, cfg.train.seed
            base_steps = load_train_state(Path(b) / "state.pt").step
            for th in thresholds:
                name = f"{task}-seed{seed}-{args.strategy}-{th:.2f}"
                jobs.append({"task": task, "seed": seed, "strategy": args.strategy,
                             "threshold": th, "base": b, "base_steps": base_steps,
                             "device": args.device, "name": name, "target": str(out / name),
                             "result": str(out / "jobs" / f"{name}-selfscale.json"),
                             "retrain_steps": args.retrain_steps,
                             "finetune_steps": args.finetune_steps})
        names = [j["name"] for j in jobs]
        if len(set(names)) < len(names):
            raise ValueError("--base: two runs share a task and seed; their results would "
                             f"collide in {out} (runs: {', '.join(bases)})")
        rows = _run_all(pool, minimize_job, jobs, t0)
        peer_jobs = [{**job, "method": m, "minimized": r, "scratch_budget": args.scratch_budget,
                      "minimized_dir": job["target"],
                      "target": str(out / f"{job['name']}-scratch"),
                      "result": str(out / "jobs" / f"{job['name']}-{m}.json")}
                     for job, r in zip(jobs, rows) for m in PEERS]
        rows += _run_all(pool, peer_job, peer_jobs, t0)
    order = {m: i for i, m in enumerate(METHODS)}
    rows.sort(key=lambda r: (r["task"], r["seed"], r["threshold"], order[r["method"]]))
    text = report(rows, args.scratch_budget)
    atomic_write_text(out / "peers.json", json.dumps(rows, indent=1) + "\n")
    atomic_write_text(out / "peers.md", text + "\n")
    print()
    print(text)
    print(f"\n{len(rows)} jobs, {time.perf_counter() - t0:.0f} s wall time with {args.workers} "
          f"worker(s); files in {out}")


def _run_all(pool: ProcessPoolExecutor, fn, jobs: list[dict[str, Any]],
             t0: float) -> list[dict[str, Any]]:
    """Run ``fn`` on every job in the pool, one progress line per finished job; rows in job
    order."""
    futures = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
    rows: list[dict[str, Any] | None] = [None] * len(jobs)
    for fut in as_completed(futures):
        i = futures[fut]
        r = rows[i] = fut.result()
        f1 = "skipped" if r.get("skipped") else f"F1 {r['f1']:.3f}"
        print(f"[{time.perf_counter() - t0:6.0f} s] {jobs[i]['name']} {r['method']}: "
              f"widths {widths_text(r['widths'])}, {f1}", flush=True)
    return rows  # type: ignore[return-value]


if __name__ == "__main__":
    main()
