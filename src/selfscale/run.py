"""A run directory: its layout, and training, evaluating and inspecting the run stored in it.

Layout (every path inside is relative, so the directory can be moved and resumed elsewhere)::

    RUN/
      config.toml        the effective config (usable again with --config)
      run.json           metadata: versions, thread count, device, resolved task parameters, data
      state.pt           the whole training state (weights, switches, Adam, step, RNG, history)
      state.pt.sha256    its checksum
      history.csv        the evaluation history, for people and spreadsheets
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from selfscale import __version__
from selfscale.checkpoint import atomic_write_text, load_state, remove_orphan_temps, save_state
from selfscale.config import RunConfig, dumps_toml
from selfscale.data import Datasets, center_crops, load_datasets
from selfscale.errors import CheckpointError, ConfigError
from selfscale.model import active_parameter_count, build_model, parameter_count
from selfscale.tasks import get_task, resolve_params
from selfscale.train import (TrainHooks, TrainState, as_input, best_record, new_state,
                             resolve_device, revive_dead_init, train)

CONFIG_FILE = "config.toml"
META_FILE = "run.json"
STATE_FILE = "state.pt"
HISTORY_FILE = "history.csv"
FORMAT_VERSION = 1


def default_run_dir(task: str, root: Path = Path("runs")) -> Path:
    """``runs/<task>``, or ``runs/<task>-2``, ``-3`` … — the first that does not exist yet."""
    candidate = root / task
    n = 2
    while candidate.exists():
        candidate = root / f"{task}-{n}"
        n += 1
    return candidate


def check_new_run_dir(path: Path) -> None:
    """Refuse to write a new run into an existing non-empty directory (nothing is overwritten)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out: {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        raise ConfigError(f"--out: {path} already exists and is not empty; use --resume to "
                          "continue that run or choose another --out")


def require_run_dir(path: Path) -> None:
    if not path.is_dir():
        raise CheckpointError(f"run directory not found: {path}")
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"not a selfscale run directory (no {STATE_FILE}): {path}")


def pin_threads(threads: int) -> int:
    """Use exactly ``threads`` intra-op threads (0: keep torch's default); returns the count used.
    Results are bit-identical only at the same thread count (REFERENCE.md)."""
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


@dataclass
class Run:
    """A run loaded from (or about to be written to) a run directory."""

    path: Path
    config: RunConfig
    state: TrainState
    meta: dict[str, Any]


def save_run(run: Run) -> None:
    """Write state, config, metadata and history; each file atomically."""
    run.path.mkdir(parents=True, exist_ok=True)
    save_state(run.path / STATE_FILE, run.state.to_dict())
    atomic_write_text(run.path / CONFIG_FILE, dumps_toml(run.config.to_dict()))
    atomic_write_text(run.path / META_FILE, json.dumps(run.meta, indent=2) + "\n")
    atomic_write_text(run.path / HISTORY_FILE, history_csv(run.state.history))


def load_run(path: Path, device: str | torch.device = "cpu") -> Run:
    """Load a run directory; a missing or damaged file → CheckpointError (one line)."""
    path = Path(path)
    require_run_dir(path)
    remove_orphan_temps(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"run directory is incomplete: {path / META_FILE} is missing") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"run metadata is corrupt: {path / META_FILE} ({exc})") from None
    if not isinstance(meta, dict) or "config" not in meta:
        raise CheckpointError(f"run metadata is corrupt: {path / META_FILE} (no config)")
    for key in ("format", "threads"):
        if not isinstance(meta.get(key, 0), int) or isinstance(meta.get(key), bool):
            raise CheckpointError(f"run metadata is corrupt: {path / META_FILE} ({key!r} must "
                                  f"be an integer, got {meta.get(key)!r})")
    if meta.get("format", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer selfscale (format "
                              f"{meta.get('format')}); upgrade selfscale to read it")
    try:
        config = RunConfig.from_dict(meta["config"])
    except ConfigError as exc:
        raise CheckpointError(f"run config in {path / META_FILE} is invalid: {exc}") from None
    return Run(path, config, load_train_state(path / STATE_FILE, device), meta)


def load_train_state(path: Path, device: str | torch.device = "cpu") -> TrainState:
    """A TrainState from a state file; damage or a wrong layout → CheckpointError (one line)."""
    dev = resolve_device(device) if isinstance(device, str) else device
    raw = load_state(path)
    try:
        return TrainState.from_dict(raw, dev)
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint is corrupt: {path} "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None


def history_csv(history: list[dict[str, Any]]) -> str:
    if not history:
        return ""
    buf = io.StringIO()
    keys = list(history[0])
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


def resolved_task(config: RunConfig) -> tuple[Any, dict[str, Any]]:
    task = get_task(config.task.name)
    return task, resolve_params(task, config.task.params)


def prepare_data(config: RunConfig, progress: bool = False) -> Datasets:
    task, params = resolved_task(config)
    if task.from_files and config.data.targets is None:
        raise ConfigError("--targets: task 'pairs' needs a folder of target images")
    return load_datasets(config.data, task, params, progress=progress)


def start_run(config: RunConfig, out: Path) -> Run:
    """A new run in ``out`` (which must not exist or be empty), initialized from the seed and saved
    at once, so ``--resume`` works from the first moment. Every operator parameter is stored."""
    out = Path(out)
    check_new_run_dir(out)
    threads = pin_threads(config.train.threads)
    task, params = resolved_task(config)
    config.task.params = params
    if config.train.loss is None:
        config.train.loss = task.default_loss
    device = resolve_device(config.train.device)
    model = build_model(config.model.widths, config.model.kernel, config.model.in_channels,
                        config.model.init_std, config.train.seed)
    meta = {
        "format": FORMAT_VERSION,
        "selfscale_version": __version__,
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "threads": threads,
        "device": str(device),
        "config": config.to_dict(),
        "parameters": parameter_count(config.model.widths, config.model.kernel,
                                      config.model.in_channels),
    }
    run = Run(out, config, new_state(model, config.train.lr, config.train.seed, device), meta)
    save_run(run)
    return run


def train_run(run: Run, *, progress: bool = False, hooks: TrainHooks | None = None,
              datasets: Datasets | None = None) -> Run:
    """Train ``run`` from its current step to ``run.config.train.steps``, checkpointing as it goes.

    A run stopped at any moment and continued with this function ends bit-identical to an
    uninterrupted one (same seed, machine and thread count; the thread count is pinned to the one
    the run started with).
    """
    pin_threads(int(run.meta.get("threads", 0)))
    cfg = run.config
    data = datasets or prepare_data(cfg, progress=progress)
    run.meta["data"] = data_summary(data)
    run.meta["config"] = cfg.to_dict()
    device = next(run.state.model.parameters()).device
    if run.state.step == 0 and "init_redraws" not in run.meta:
        probe, _ = center_crops(data.train[:8], min(cfg.data.effective_train_crop, 64))
        run.meta["init_redraws"] = revive_dead_init(run.state, as_input(probe, device),
                                                    cfg.model.init_std)
    user_hooks = hooks or TrainHooks()

    def checkpoint(state: TrainState) -> None:
        save_run(run)
        if user_hooks.on_checkpoint:
            user_hooks.on_checkpoint(state)

    train(run.state, data.train, data.eval, until_step=cfg.train.steps, loss=cfg.train.loss,
          batch=cfg.data.batch, train_crop=cfg.data.effective_train_crop,
          eval_crop=cfg.data.crop, flips=cfg.data.flips, eval_every=cfg.train.eval_every,
          device=device, checkpoint_every=cfg.train.checkpoint_every,
          hooks=TrainHooks(user_hooks.on_step, user_hooks.on_eval, checkpoint))
    save_run(run)
    return run


def data_summary(data: Datasets) -> dict[str, Any]:
    return {
        "source": data.source,
        "train": list(data.train.names),
        "eval": list(data.eval.names),
        "skipped": dict(data.report.skipped),
    }


def run_info(run: Run) -> dict[str, Any]:
    """What ``selfscale info`` shows: config, task, architecture, switches, counts, scores."""
    model = run.state.model
    last = run.state.history[-1] if run.state.history else None
    return {
        "run_dir": str(run.path),
        "task": {"name": run.config.task.name, "params": run.config.task.params},
        "architecture": {
            "widths": list(model.widths),
            "kernel": model.kernel,
            "layers": len(model.widths),
            "active_masks": list(model.active_widths()),
            "enabled": model.enabled_masks(),
            "frozen": model.frozen_masks(),
            "parameters": parameter_count(model.widths, model.kernel, model.in_channels),
            "active_parameters": active_parameter_count(model),
        },
        "step": run.state.step,
        "target_steps": run.config.train.steps,
        "last_eval": last,
        "best_eval": best_record(run.state.history),
        "config": run.config.to_dict(),
        "threads": run.meta.get("threads"),
        "created": run.meta.get("created"),
        "data": run.meta.get("data"),
    }

