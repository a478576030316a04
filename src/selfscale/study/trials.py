"""The work inside trials, run on Dask workers: train a network from scratch, minimize one.

A trial is a plain dict (``id``, ``kind``, its parameters, its own seed); :func:`execute` runs it
and returns ``{"result": {...}, "files": {name: bytes}}``. Nothing here assumes a disk shared with
the client: each trial works in a temporary directory on its worker and returns the files worth
keeping (a trained network's run directory, a minimized network) as bytes. A minimization gets
its base network the same way: the base trial's output (its result and files), passed in by the
engine, is written into the minimization's own temporary run directory.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RUN_FILES = ("config.toml", "run.json", "state.pt", "state.pt.sha256", "history.csv")
"""The files of a trained network's run directory (:mod:`selfscale.run`)."""
NETWORK_FILES = ("final.pt", "final.pt.sha256", "summary.json")
"""The files kept of a minimization (``RUN/minimize/``): the minimized network and summary."""
SCORES = ("f1", "mae", "mse", "uiqi")


def execute(trial: dict[str, Any], needed: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one trial (one torch thread); ``needed`` is the output of the trial it needs."""
    import torch

    from selfscale.study.worth import worth_trial

    torch.set_num_threads(1)
    kinds = {"train": train_trial, "minimize": minimize_trial, "worth": worth_trial}
    if trial["kind"] not in kinds:
        raise ValueError(f"unknown trial kind {trial['kind']!r}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = kinds[trial["kind"]](trial, needed)
    out["result"]["warnings"] = sorted({str(w.message) for w in caught})
    return out


def train_trial(trial: dict[str, Any], needed: None = None) -> dict[str, Any]:
    """Train ``trial["config"]`` (a complete RunConfig dict) from scratch; the result holds the
    final eval scores, size, steps and wall time, the files are the run directory."""
    from selfscale.config import RunConfig
    from selfscale.model import macs_per_pixel, parameter_count
    from selfscale.run import prepare_data, start_run, train_run
    from selfscale.train import evaluate

    t0 = time.perf_counter()
    config = RunConfig.from_dict(trial["config"])
    with tempfile.TemporaryDirectory(prefix="selfscale-trial-") as tmp:
        data = prepare_data(config)
        run = train_run(start_run(config, Path(tmp) / "run"), data)
        spec = run.spec()
        scores = evaluate(run.state.model, data.eval, spec.eval_crop, spec.device)
        files = {name: (run.path / name).read_bytes() for name in RUN_FILES
                 if (run.path / name).is_file()}
    widths, m = list(config.model.widths), config.model
    result = {
        "widths": widths,
        "scores": {k: float(scores[k]) for k in SCORES},
        "parameters": parameter_count(widths, m.kernel, m.in_channels),
        "macs_per_pixel": macs_per_pixel(widths, m.kernel, m.in_channels),
        "steps": run.state.step,
        "dead": bool(run.meta.get("dead", False)),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return {"result": result, "files": files}


def minimize_trial(trial: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Minimize a copy of the base network (``base``: the train trial's output) with
    ``trial["minimize"]`` (a complete MinimizeConfig dict); the result holds the summary and the
    decision log, the files the minimized network."""
    from selfscale.config import MinimizeConfig
    from selfscale.minimize.session import minimize_run
    from selfscale.run import MIN_DIR, load_run, prepare_data

    t0 = time.perf_counter()
    config = MinimizeConfig(**trial["minimize"])
    with base_run_dir(base) as path:
        run = load_run(path, "cpu")
        res = minimize_run(run, prepare_data(run.config), config)
        files = {name: (path / MIN_DIR / name).read_bytes() for name in NETWORK_FILES}
    s, metric = res.summary, config.metric
    result = {
        **{k: s[k] for k in ("widths_before", "widths_after", "layers_before", "layers_after",
                             "masks_before", "masks_after", "parameters_before",
                             "parameters_after", "macs_per_pixel_before",
                             "macs_per_pixel_after", "decisions", "kept", "free_removals",
                             "steps_trained", "finetune_steps")},
        "scores_before": {k: float(s["scores_before"][k]) for k in SCORES},
        "scores_after": {k: float(s["scores_after"][k]) for k in SCORES},
        "ratio": ratio(s["scores_after"][metric], s["scores_before"][metric]),
        "masks_removed": s["masks_before"] - s["masks_after"],
        "mask_matrix": s["mask_matrix"],
        "decision_log": res.minimization.log,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return {"result": result, "files": files}


@contextlib.contextmanager
def base_run_dir(base: dict[str, Any]) -> Iterator[Path]:
    """A temporary run directory holding a base trial's files (workers share no disk)."""
    with tempfile.TemporaryDirectory(prefix="selfscale-trial-") as tmp:
        path = Path(tmp) / "run"
        path.mkdir()
        for name, data in base["files"].items():
            (path / name).write_bytes(data)
        yield path


def ratio(after: float, before: float) -> float:
    """final/base score; 0 when the base score is 0 (a dead base is refused before this)."""
    return float(after) / float(before) if before else 0.0
