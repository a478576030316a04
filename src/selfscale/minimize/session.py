"""A minimization stored in a run directory: starting, resuming, its result files, and which
network (base or minimized) a run directory serves.

Files in ``RUN/minimize/``::

    state.pt (+ .sha256)   the loop's whole state after the last decision (for --resume)
    final.pt (+ .sha256)   the minimized network (a training state: weights, switches, origin)
    decisions.csv / .jsonl one row per decision: what was tried, scores, ratio, kept, time
    summary.json           before/after: masks, layers, parameters, MACs per pixel, scores
    masks.txt              the mask matrix over the original network (thesis's one-hot matrix)
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from selfscale.checkpoint import atomic_write_text, load_state, save_state
from selfscale.config import MinimizeConfig
from selfscale.errors import CheckpointError, ConfigError
from selfscale.data import Datasets
from selfscale.minimize.loop import (LoopHooks, Minimization, TrainEnv, mask_matrix, minimize,
                                     start, summary)
from selfscale.model import FCN
from selfscale.run import (CONFIG_FILE, HISTORY_FILE, META_FILE, STATE_FILE, Run,
                           check_new_run_dir, load_run, load_train_state, pin_threads,
                           prepare_data, train_run)
from selfscale.train import TrainHooks, evaluate

MIN_DIR = "minimize"
LOOP_FILE = "state.pt"
FINAL_FILE = "final.pt"
STAGES = ("auto", "base", "minimized")


def train_env(run: Run, data: Datasets) -> TrainEnv:
    cfg = run.config
    return TrainEnv(train_set=data.train, eval_set=data.eval,
                    device=next(run.state.model.parameters()).device, loss=cfg.train.loss,
                    batch=cfg.data.batch, train_crop=cfg.data.effective_train_crop,
                    eval_crop=cfg.data.crop, flips=cfg.data.flips, init_std=cfg.model.init_std)


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


def minimize_run(run_dir: Path, config: MinimizeConfig, *, out: Path | None = None,
                 resume: bool = False, device: str = "auto", progress: bool = False,
                 on_decision: Callable[[Minimization, dict[str, Any]], None] | None = None,
                 train_hooks: TrainHooks | None = None) -> MinimizeResult:
    """Minimize the run in ``run_dir`` (or a copy of it in ``out``) and write the results.

    With ``resume`` the stored minimization continues from its last decision with its stored
    config; the end result equals that of an uninterrupted minimization with the same seed.
    """
    run_dir = Path(run_dir)
    load_run(run_dir)  # a missing or corrupt run fails here, before anything is written
    target = run_dir
    if out is not None and not resume:
        copy_run(run_dir, Path(out))
        target = Path(out)
    elif out is not None:
        target = Path(out)
    mdir = target / MIN_DIR
    if resume:
        if not (mdir / LOOP_FILE).is_file():
            raise ConfigError(f"--resume: no minimization to resume in {target}")
    elif mdir.exists() and any(mdir.iterdir()):
        raise ConfigError(f"{target} is already minimized ({mdir}); use --resume to continue "
                          "it or --out DIR to minimize into a new run directory")
    run = load_run(target, device)
    pin_threads(int(run.meta.get("threads", 0)))
    if resume:
        m = Minimization.from_dict(load_state(mdir / LOOP_FILE),
                                   next(run.state.model.parameters()).device)
        env = train_env(run, prepare_data(run.config, progress=progress))
    else:
        data = prepare_data(run.config, progress=progress)  # loaded once for both phases
        if config.base_steps is not None and config.base_steps > run.state.step:
            run.config.train.steps = config.base_steps  # base training (thesis: 10 000 steps)
            train_run(run, progress=progress, hooks=train_hooks, datasets=data)
        env = train_env(run, data)
        m = start(run.state, config, env)
        save_state(mdir / LOOP_FILE, m.to_dict())

    def on_save(mm: Minimization) -> None:
        save_state(mdir / LOOP_FILE, mm.to_dict())
        write_decisions(mdir, mm.log)

    minimize(m, env, LoopHooks(on_decision=on_decision, on_save=on_save))
    final_scores = evaluate(m.current.model, env.eval_set, env.eval_crop, env.device)
    final_scores.pop("n_images")
    result = summary(m, final_scores)
    final = m.current.to_dict() | {"origin": m.origin, "orig_widths": m.orig_widths}
    save_state(mdir / FINAL_FILE, final)
    write_decisions(mdir, m.log)
    atomic_write_text(mdir / "summary.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(mdir / "masks.txt", mask_matrix_text(mask_matrix(m)))
    return MinimizeResult(target, m, result)


DECISION_FIELDS = ("step", "phase", "strategy", "tried", "layer", "mask", "metric", "reference",
                   "score", "ratio", "threshold", "kept", "steps_trained", "active", "f1", "mae",
                   "mse", "uiqi", "seconds")


def write_decisions(mdir: Path, log: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=DECISION_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in log:
        writer.writerow({**row, "active": " ".join(map(str, row["active"]))})
    atomic_write_text(mdir / "decisions.csv", buf.getvalue())
    atomic_write_text(mdir / "decisions.jsonl", "".join(json.dumps(r) + "\n" for r in log))


def mask_matrix_text(matrix: list[list[bool]]) -> str:
    """One row per original layer: 1 where a mask remains, 0 where it can be removed."""
    lines = ["# mask matrix: rows = layers of the original network, 1 = mask remains"]
    for i, row in enumerate(matrix):
        lines.append(f"layer {i + 1}: " + " ".join("1" if on else "0" for on in row)
                     + ("   (layer removed)" if not any(row) else ""))
    return "\n".join(lines) + "\n"


def has_minimized(run_dir: Path) -> bool:
    return (Path(run_dir) / MIN_DIR / FINAL_FILE).is_file()


def load_network(run_dir: Path, stage: str = "auto",
                 device: str | torch.device = "cpu") -> tuple[Run, FCN, str]:
    """The network a run directory serves: the minimized one when it exists (``auto``), or the
    stage asked for. Returns (run, model, stage used)."""
    if stage not in STAGES:
        raise ConfigError(f"--stage: must be one of {', '.join(STAGES)}, got {stage!r}")
    run = load_run(run_dir, device)
    started = (Path(run_dir) / MIN_DIR / LOOP_FILE).is_file()
    if stage == "auto" and started and not has_minimized(run_dir):
        raise CheckpointError(f"{run_dir}: its minimization has not finished (no "
                              f"{MIN_DIR}/{FINAL_FILE}); continue it with 'selfscale minimize "
                              f"{run_dir} --resume', or use --stage base")
    if stage == "base" or (stage == "auto" and not has_minimized(run_dir)):
        return run, run.state.model, "base"
    if not has_minimized(run_dir):
        raise CheckpointError(f"--stage minimized: {run_dir} has not been minimized "
                              f"(run 'selfscale minimize {run_dir}' first)")
    state = load_train_state(Path(run_dir) / MIN_DIR / FINAL_FILE, device)
    return run, state.model, "minimized"


def load_summary(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / MIN_DIR / "summary.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"minimization summary is corrupt: {path}") from None
