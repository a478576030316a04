"""``selfscale visualize RUN_DIR``: every picture of one run directory, and the command's entry.

Written into ``--out DIR``:

* ``masks.png``: the masks per layer (thesis Fig 3.1, :func:`selfscale.visualize.mask_picture`);
* ``outputs.png``: the output of every mask of every layer for an input image (Fig 3.4): the
  ``--image`` file, or the run's first eval image, centre-cropped to at most :data:`MAX_SIDE`;
* ``curves.png`` / ``.svg``: the training loss and each metric against the step (history.csv);
* ``decisions.png`` / ``.svg``: for a minimized network, the score of every decision against the
  kept reference × threshold, kept, stepped-back and stopped-early decisions marked;
* ``snapshots.png``: input, target and output of the eval crops at stored training steps
  (Fig 3.2–3.3), when the run was trained with ``--snapshot-every``.

This module is light on purpose: the CLI's command table takes :data:`ENTRIES` from it, and the
functions import torch and matplotlib only when they run.
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_SIDE = 512
"""An input image larger than this is centre-cropped to it (the picture shows 96² tiles)."""
MAX_SNAPSHOTS = 6
"""Without --steps, at most this many stored steps are shown, evenly spread."""
CURVE_METRICS = ("loss", "f1", "uiqi", "mae", "mse")


@dataclass
class Pictures:
    """What :func:`write_pictures` wrote."""

    stage: str
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _read_csv(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _input_image(run, image: Path | None):
    """The --image file (2-D float32 in [0, 1]) or the run's first eval image, centre-cropped to
    at most MAX_SIDE; an unreadable file → ConfigError."""
    import numpy as np

    from selfscale.errors import ConfigError
    from selfscale.images import BadImage, load_gray

    if image is not None:
        try:
            array = load_gray(image)
        except BadImage as exc:
            raise ConfigError(f"--image: {exc}") from None
        name = Path(image).name
    else:
        from selfscale.run import prepare_data

        data = prepare_data(run.config)
        array, name = np.asarray(data.eval.inputs[0], np.float32), data.eval.names[0]
    h, w = array.shape
    top, left = max((h - MAX_SIDE) // 2, 0), max((w - MAX_SIDE) // 2, 0)
    return array[top:top + MAX_SIDE, left:left + MAX_SIDE], name


def chosen_steps(stored: list[int], steps: list[int] | None) -> list[int]:
    """The snapshot steps to show: ``steps`` (each must be stored), or at most MAX_SNAPSHOTS
    of the stored ones, evenly spread, first and last included."""
    from selfscale.errors import ConfigError

    if steps:
        missing = [s for s in steps if s not in stored]
        if missing:
            raise ConfigError(f"--steps: no snapshot at step {missing[0]} (stored: "
                              f"{', '.join(map(str, stored)) or 'none'})")
        return list(steps)
    if len(stored) <= MAX_SNAPSHOTS:
        return list(stored)
    picks = {round(i * (len(stored) - 1) / (MAX_SNAPSHOTS - 1)) for i in range(MAX_SNAPSHOTS)}
    return [stored[i] for i in sorted(picks)]


def write_pictures(run_dir: Path, out: Path, *, stage: str = "auto", image: Path | None = None,
                   steps: list[int] | None = None) -> Pictures:
    """Write every picture of the run in ``run_dir`` at ``stage`` into ``out`` (see the module
    docstring). Not a run directory, a stage the run lacks → CheckpointError; an unreadable
    ``image`` or a ``steps`` entry without a snapshot → ConfigError."""
    from selfscale.run import HISTORY_FILE, MIN_DIR, load_network
    from selfscale.snapshots import read_snapshots
    from selfscale.visualize import mask_picture, outputs_picture, preview_grid

    run, model, used = load_network(Path(run_dir), stage)
    array, name = _input_image(run, image)
    inputs, targets, shots = read_snapshots(run.path)
    shown = chosen_steps(sorted(shots), steps) if shots or steps else []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = Pictures(used)
    mask_picture(model).save(out / "masks.png")
    outputs_picture(model, array).save(out / "outputs.png")
    result.files += [out / "masks.png", out / "outputs.png"]
    result.notes.append(f"outputs.png: {name}")
    history = _read_csv(run.path / HISTORY_FILE)
    if history:
        result.files.append(curves_figure(history, out / "curves",
                                          title=f"{run.config.task.name}: training of "
                                                f"{run.path.name}"))
    decisions = MIN_DIR + "/decisions.jsonl"
    if used == "minimized" and (run.path / decisions).is_file():
        log = [json.loads(line) for line in (run.path / decisions).read_text().splitlines()
               if line.strip()]
        if log:
            result.files.append(decisions_figure(log, out / "decisions"))
    if shown:
        rows = [[inputs[i] / 255.0, targets[i] / 255.0]
                + [shots[s][i] / 255.0 for s in shown] for i in range(len(inputs))]
        preview_grid(rows, ["input", "target"] + [f"step {s}" for s in shown]).save(
            out / "snapshots.png")
        result.files.append(out / "snapshots.png")
    else:
        result.notes.append("no training snapshots (train with --snapshot-every N to have them)")
    return result


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, stem: Path) -> Path:
    from selfscale.study.figures import _save as save

    return save(fig, stem)


def curves_figure(history: list[dict[str, Any]], stem: Path, *, title: str) -> Path:
    """The training loss and each metric against the step, one panel each (PNG and SVG)."""
    from selfscale.study.figures import STYLE

    plt = _plt()
    names = [n for n in CURVE_METRICS if n in history[0]]
    steps = [int(float(r["step"])) for r in history]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.6), squeeze=False)
        for ax, name in zip(axes[0], names):
            ax.plot(steps, [float(r[name]) for r in history], marker="o", ms=2.5, lw=1.2)
            ax.set_title(name + (" (training batch)" if name == "loss" else " (eval)"),
                         fontsize=9)
            ax.set_xlabel("step")
        fig.suptitle(title)
        fig.tight_layout()
        return _save(fig, stem)


def decision_points(log: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """(decision number, score) of each decision by outcome: kept, stepped back after its whole
    retrain, or stopped early (--abort-below: the score where its retrain stopped)."""
    groups: dict[str, list[tuple[int, float]]] = {"kept": [], "stepped back": [],
                                                  "stopped early": []}
    for x, d in enumerate(log, start=1):
        outcome = ("kept" if d["kept"] else
                   "stopped early" if d.get("stopped_early") else "stepped back")
        groups[outcome].append((x, d["score"]))
    return groups


def decisions_figure(log: list[dict[str, Any]], stem: Path) -> Path:
    """The minimization's decisions: each decision's score, kept (green dot), stepped back (red
    cross) or stopped early (orange triangle), with the reference × threshold it was judged
    against (PNG and SVG)."""
    from selfscale.study.figures import STYLE

    plt = _plt()
    xs = list(range(1, len(log) + 1))
    metric = log[0].get("metric", "f1")
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(max(4.5, 0.35 * len(log) + 2), 3.4))
        ax.step(xs, [d["reference"] * d["threshold"] for d in log], where="mid", color="0.4",
                ls="--", lw=1, label="reference × threshold")
        ax.plot(xs, [d["score"] for d in log], color="0.75", lw=0.8)
        styles = {"kept": ("o", "tab:green"), "stepped back": ("x", "tab:red"),
                  "stopped early": ("v", "tab:orange")}
        for outcome, pts in decision_points(log).items():
            if pts:
                marker, color = styles[outcome]
                ax.plot(*zip(*pts), ls="none", ms=6, marker=marker, color=color,
                        label=outcome)
        ax.set_xticks(xs, [d.get("tried", str(x)) for x, d in zip(xs, log)], rotation=60,
                      ha="right", fontsize=7)
        ax.set_xlabel("decision (what was tried)")
        stopped = any(d.get("stopped_early") for d in log)
        ax.set_ylabel(f"{metric} after the retrain" + (" (or its stop)" if stopped else ""))
        ax.legend(fontsize=8, loc="best")
        ax.set_title(f"minimization: {sum(bool(d['kept']) for d in log)} of {len(log)} "
                     "decisions kept", fontsize=9)
        fig.tight_layout()
        return _save(fig, stem)


# --- the command --------------------------------------------------------------------------------

def _steps(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated step numbers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"must be comma-separated step numbers, got {text!r}")
    return values


def visualize_flags(p: argparse.ArgumentParser) -> None:
    from selfscale.flags import common_options

    common_options(p, "run_dir", "stage")
    p.add_argument("--image", type=Path, metavar="FILE",
                   help="input image of outputs.png (default: the run's first eval image); "
                        f"centre-cropped to at most {MAX_SIDE}²")
    p.add_argument("--steps", type=_steps, metavar="S1,S2,...",
                   help="training steps of the snapshots to show (default: up to "
                        f"{MAX_SNAPSHOTS} of the stored ones, evenly spread)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="folder to write the pictures into (created if missing)")


def cmd_visualize(args: argparse.Namespace) -> int:
    result = write_pictures(args.run_dir, args.out, stage=args.stage, image=args.image,
                            steps=args.steps)
    print(f"{result.stage} network of {args.run_dir}: wrote "
          + ", ".join(p.name for p in result.files) + f" to {args.out}")
    for note in result.notes:
        print(f"  {note}")
    return 0


ENTRIES = {
    "visualize": (cmd_visualize, visualize_flags, "pictures of a run: masks, outputs, curves",
                  "Write pictures of a run into --out: masks.png (masks per layer, red negative, "
                  "green positive; removed masks crossed out, kernels reading them greyed), "
                  "outputs.png (every mask's output for an image), curves.png/.svg (loss and "
                  "metrics against the step), decisions.png/.svg (a minimized run's decisions) "
                  "and snapshots.png (input, target and output at training steps; train with "
                  "--snapshot-every N)."),
}
"""subcommand → (function, flag builder, one-line help, description), for selfscale.cli."""
