"""A minimization stored in a run directory: starting, resuming, and its result files.

Files in ``RUN/minimize/``::

    state.pt (+ .sha256)   the loop's whole state after the last decision (for --resume)
    final.pt (+ .sha256)   the minimized network (a training state: weights, switches, origin)
    decisions.csv / .jsonl one row per decision: what was tried, scores, ratio, kept, time
    summary.json           before/after: masks, layers, parameters, MACs per pixel, scores
    masks.txt              the mask matrix over the original network (thesis's one-hot matrix)

Which network a run directory serves (base or minimized) is the run module's business
(:func:`selfscale.run.network`); this package depends on runs, never the reverse.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfscale.checkpoint import atomic_write_text, load_state, save_state
from selfscale.config import MinimizeConfig
from selfscale.data import Datasets
from selfscale.errors import ConfigError
from selfscale.minimize.loop import LoopHooks, Minimization, minimize, start
from selfscale.minimize.summary import mask_matrix, summary
from selfscale.run import (CONFIG_FILE, FINAL_FILE, HISTORY_FILE, LOOP_FILE, META_FILE, MIN_DIR,
                           STATE_FILE, SUMMARY_FILE, Run, check_new_run_dir, pin_conv, pin_threads,
                           train_run, with_steps)
from selfscale.minimize.alter import REMOVING_MODE
from selfscale.train import TrainHooks, evaluate, is_dead


def copy_run(src: Path, dst: Path) -> None:
    """Copy a run's base files into a new run directory (for ``minimize --out``)."""
    check_new_run_dir(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, META_FILE, STATE_FILE, STATE_FILE + ".sha256", HISTORY_FILE):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


@dataclass
class MinimizeResult:
    run_dir: Path
    minimization: Minimization
    summary: dict[str, Any]


def minimize_run(run: Run, data: Datasets, config: MinimizeConfig, *, out: Path | None = None,
                 resume: bool = False,
                 on_decision: Callable[[Minimization, dict[str, Any]], None] | None = None,
                 train_hooks: TrainHooks | None = None) -> MinimizeResult:
    """Minimize ``run`` (in its directory, or in a copy of it in ``out``) and write the results.
    To resume into ``out``, pass the run loaded from ``out``.

    With ``resume`` the stored minimization continues from its last decision with its stored
    config; the end result equals that of an uninterrupted minimization with the same seed. When
    nothing was saved yet, it starts from the beginning (with a warning saying so).
    """
    target = Path(out) if out is not None else run.path
    mdir = target / MIN_DIR
    if resume and not (mdir / LOOP_FILE).is_file():
        warnings.warn(f"--resume: no minimization was saved in {target} yet; starting it from "
                      "the beginning", stacklevel=2)
        resume = False
    elif not resume:
        if out is not None:
            copy_run(run.path, target)
        elif mdir.exists() and any(mdir.iterdir()):
            raise ConfigError(f"{target} is already minimized ({mdir}); use --resume to continue "
                              "it or --out DIR to minimize into a new run directory")
    run.path = target
    pin_threads(int(run.meta.get("threads", 0)))
    pin_conv(str(run.meta.get("conv", "torch")), run.path)
    if resume:
        m = Minimization.from_dict(load_state(mdir / LOOP_FILE), run.device)
    else:
        if config.base_steps is not None and config.base_steps > run.state.step:
            train_run(with_steps(run, config.base_steps), data, hooks=train_hooks)  # thesis: 10 000
        spec = run.spec()
        if is_dead(run.state.model, data.eval, spec.eval_crop, spec.device):
            raise ConfigError(f"{run.path}: the base network is dead (its output is zero on every "
                              "eval pixel), so there is nothing to minimize; train it again with "
                              "a lower --lr or another --seed")
        if config.mode != REMOVING_MODE and not config.reinit:
            warnings.warn(f"--no-reinit: a mask reset to zero outputs zero everywhere, its ReLU "
                          f"passes no gradient and it cannot relearn in mode {config.mode}; "
                          "such masks are reported dead and removed", stacklevel=2)
        m = start(run.state, config, spec, data)
        save_state(mdir / LOOP_FILE, m.to_dict())

    written = -1  # decisions in the decision files this process wrote

    def log_decisions(mm: Minimization) -> None:  # they change only with the log
        nonlocal written
        if len(mm.log) != written:
            write_decisions(mdir, mm.log)
            written = len(mm.log)

    def on_save(mm: Minimization) -> None:
        save_state(mdir / LOOP_FILE, mm.to_dict())
        log_decisions(mm)

    spec = run.spec()
    minimize(m, spec, data, LoopHooks(on_decision=on_decision, on_save=on_save))
    if m.finetune is not None and "scores_after" in m.finetune:  # the network's scores as it is
        final_scores = dict(m.finetune["scores_after"])
    else:
        final_scores = evaluate(m.current.model, data.eval, spec.eval_crop, spec.device)
        final_scores.pop("n_images")
    result = summary(m, final_scores)
    final = m.current.to_dict() | {"origin": m.origin, "orig_widths": m.orig_widths}
    save_state(mdir / FINAL_FILE, final)
    log_decisions(m)
    atomic_write_text(mdir / SUMMARY_FILE, json.dumps(result, indent=2) + "\n")
    atomic_write_text(mdir / "masks.txt", mask_matrix_text(mask_matrix(m)))
    return MinimizeResult(target, m, result)


DECISION_FIELDS = ("step", "phase", "strategy", "tried", "layer", "mask", "metric", "reference",
                   "score", "ratio", "threshold", "kept", "steps_trained", "active", "f1", "mae",
                   "mse", "uiqi", "seconds", "dead", "paired_reference",
                   "stopped_early", "trajectory")


def write_decisions(mdir: Path, log: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=DECISION_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in log:
        writer.writerow({**row, "active": " ".join(map(str, row["active"])),
                         "dead": "; ".join(row.get("dead", [])),
                         "trajectory": " ".join(f"{v:.6g}" for v in row.get("trajectory", []))})
    atomic_write_text(mdir / "decisions.csv", buf.getvalue())
    atomic_write_text(mdir / "decisions.jsonl", "".join(json.dumps(r) + "\n" for r in log))


def mask_matrix_text(matrix: list[list[bool]]) -> str:
    """One row per original layer: 1 where a mask remains, 0 where it can be removed."""
    lines = ["# mask matrix: rows = layers of the original network, 1 = mask remains"]
    for i, row in enumerate(matrix):
        lines.append(f"layer {i + 1}: " + " ".join("1" if on else "0" for on in row)
                     + ("   (layer removed)" if not any(row) else ""))
    return "\n".join(lines) + "\n"
