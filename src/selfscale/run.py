"""A run directory: its layout, starting, training and resuming the run in it, and the networks
it serves (the base network, or the minimized one once ``selfscale minimize`` has run).

Layout (every path inside is relative, so the directory can be moved and resumed elsewhere)::

    RUN/
      config.toml        the run's config, the one source of truth (usable again with --config)
      run.json           metadata: versions, thread count, device, data, initialization redraws
      state.pt           the whole training state (weights, switches, Adam, step, RNG, history)
      state.pt.sha256    its checksum
      history.csv        the evaluation history, for people and spreadsheets
      minimize/          written by a minimization (see :mod:`selfscale.minimize.session`);
                         final.pt is the minimized network, summary.json its summary
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from selfscale import __version__, direct
from selfscale.checkpoint import atomic_write_text, load_state, remove_orphan_temps, save_state
from selfscale.config import RunConfig, TaskConfig, config_diff, merge_sections
from selfscale.crops import center_crops
from selfscale.data import Datasets, load_datasets
from selfscale.errors import CheckpointError, ConfigError
from selfscale.flags import flag_of
from selfscale.model import FCN, Init, active_parameter_count, build_model, parameter_count
from selfscale.tasks import get_task, resolve_params
from selfscale.tomlfile import dumps_toml, load_toml
from selfscale.train import (TrainHooks, TrainSpec, TrainState, as_input, best_record, is_dead,
                             new_state, resolve_device, revive_dead_init, train)

CONFIG_FILE = "config.toml"
META_FILE = "run.json"
STATE_FILE = "state.pt"
HISTORY_FILE = "history.csv"
MIN_DIR = "minimize"
"""Sub-folder of a minimization's files."""
FINAL_FILE = "final.pt"
"""The minimized network, in ``MIN_DIR``."""
LOOP_FILE = "state.pt"
"""The unfinished minimization's state, in ``MIN_DIR``."""
SUMMARY_FILE = "summary.json"
STAGES = ("auto", "base", "minimized")
"""Which network of a run: auto = the minimized one when it exists, else the base network."""
FORMAT_VERSION = 2
"""2: the config lives in config.toml only (1 kept a copy in run.json, still read)."""
RESUMABLE = {("train", "steps"), ("train", "device")}
"""Config fields that may change when a run is resumed: its length and where it runs."""


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


def pin_conv(conv: str, path: Path) -> str:
    """Use the convolution the run started with (runs older than ``--conv``: torch). Without a
    compiler a direct run goes on with torch's convolutions, with a warning: its results then
    differ from an uninterrupted run in float rounding."""
    if conv == "direct" and direct.library() is None:
        warnings.warn(f"{path}: trained with --conv direct, which cannot be built here "
                      f"({direct.failure()}); going on with --conv torch, so results differ "
                      "from an uninterrupted run in float rounding", stacklevel=2)
        conv = "torch"
    return direct.use(conv if conv in direct.MODES else "torch")


@dataclass
class Run:
    """A run loaded from (or about to be written to) a run directory."""

    path: Path
    config: RunConfig
    state: TrainState
    meta: dict[str, Any]

    @property
    def device(self) -> torch.device:
        return next(self.state.model.parameters()).device

    def spec(self) -> TrainSpec:
        """How this run trains (and how a minimization of it retrains)."""
        return TrainSpec.from_config(self.config, self.device)


def save_run(run: Run) -> None:
    """Write state, config, metadata and history; each file atomically."""
    run.path.mkdir(parents=True, exist_ok=True)
    save_state(run.path / STATE_FILE, run.state.to_dict())
    atomic_write_text(run.path / CONFIG_FILE, dumps_toml(run.config.to_dict()))
    atomic_write_text(run.path / META_FILE, json.dumps(run.meta, indent=2) + "\n")
    atomic_write_text(run.path / HISTORY_FILE, history_csv(run.state.history))


def read_run_config(path: Path) -> tuple[RunConfig, dict[str, Any]]:
    """The config (from config.toml) and metadata (run.json) of a run directory; a missing or
    damaged file → CheckpointError (one line)."""
    path = Path(path)
    require_run_dir(path)
    remove_orphan_temps(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"run directory is incomplete: {path / META_FILE} is missing") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"run metadata is corrupt: {path / META_FILE} ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"run metadata is corrupt: {path / META_FILE} (not an object)")
    for key in ("format", "threads"):
        if not isinstance(meta.get(key, 0), int) or isinstance(meta.get(key), bool):
            raise CheckpointError(f"run metadata is corrupt: {path / META_FILE} ({key!r} must "
                                  f"be an integer, got {meta.get(key)!r})")
    if meta.get("format", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer selfscale (format "
                              f"{meta.get('format')}); upgrade selfscale to read it")
    where = path / CONFIG_FILE
    try:
        if meta.get("format", 0) < 2:  # format 1: its copy in run.json, the thesis's recipe
            if "config" in meta:
                where, raw = path / META_FILE, meta.pop("config")
            else:
                raw = load_toml(where)
            raw = merge_sections({"train": {"recipe": "thesis"}}, raw)
        else:
            raw = load_toml(where)
        return resolve_config(RunConfig.from_dict(raw)), meta
    except ConfigError as exc:
        raise CheckpointError(f"run config {where} is invalid: {exc}") from None


def load_run(path: Path, device: str | torch.device = "cpu") -> Run:
    """Load a run directory; a missing or damaged file → CheckpointError (one line)."""
    config, meta = read_run_config(path)
    pin_conv(str(meta.get("conv", "torch")), Path(path))
    return Run(Path(path), config, load_train_state(Path(path) / STATE_FILE, device), meta)


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


def resolve_config(config: RunConfig) -> RunConfig:
    """The config a run stores: every operator parameter filled in, the task's default loss."""
    task, params = resolved_task(config)
    return dataclasses.replace(
        config, task=TaskConfig(config.task.name, params),
        train=dataclasses.replace(config.train, loss=config.train.loss or task.default_loss))


def prepare_data(config: RunConfig, progress: bool = False) -> Datasets:
    task, params = resolved_task(config)
    return load_datasets(config.data, task, params, progress=progress)


def start_run(config: RunConfig, out: Path) -> Run:
    """A new run in ``out`` (which must not exist or be empty), initialized from the seed and saved
    at once, so ``--resume`` works from the first moment. Every operator parameter is stored."""
    out = Path(out)
    check_new_run_dir(out)
    threads = pin_threads(config.train.threads)
    config = resolve_config(config)
    device = resolve_device(config.train.device)
    conv = direct.use(config.train.conv if device.type == "cpu" else "torch")
    m = config.model
    model = build_model(m.widths, m.kernel, m.in_channels, Init(m.init, m.init_std, m.init_bias),
                        config.train.seed)
    meta = {
        "format": FORMAT_VERSION,
        "selfscale_version": __version__,
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "threads": threads,
        "conv": conv,
        "device": str(device),
        "parameters": parameter_count(config.model.widths, config.model.kernel,
                                      config.model.in_channels),
    }
    run = Run(out, config, new_state(model, config.train.lr, config.train.seed, device), meta)
    save_run(run)
    return run


def resume_run(path: Path, given: dict[str, dict[str, Any]]) -> Run:
    """The run in ``path``, to be trained further. ``given`` holds the config values the user gave
    now (``{section: {field: value}}``, e.g. the flags of the original command): values equal to
    the stored ones are accepted, ``--steps`` and ``--device`` may change, anything else is a
    ConfigError naming the flag with the stored and the given value."""
    path = Path(path)
    stored, _ = read_run_config(path)
    if (path / MIN_DIR).exists():
        raise ConfigError(f"--resume: {path} has been minimized; training its base network "
                          "further would leave the minimization stale (copy the run or start "
                          "a new one)")
    config = resolve_config(RunConfig.from_dict(merge_sections(stored.to_dict(), given)))
    for section, name, old, new in config_diff(stored, config):
        if (section, name) not in RESUMABLE:
            flag = flag_of(type(getattr(stored, section)), name)
            if name == "params":
                flag = "--task-param"
                changed = [k for k in new if old.get(k) != new[k]]
                old, new = ({k: d.get(k) for k in changed} for d in (old, new))
            raise ConfigError(f"{flag}: cannot be changed when resuming (the run has "
                              f"{_shown(old)}, given {_shown(new)}); only --steps and --device "
                              "may change")
    run = load_run(path, config.train.device)
    if config.train.steps < run.state.step:
        raise ConfigError(f"--steps: the run is already at step {run.state.step}; give at least "
                          "that many")
    run.config = config
    return run


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def with_steps(run: Run, steps: int) -> Run:
    """The run, set to train up to ``steps`` in total (e.g. ``minimize --base-steps``)."""
    run.config = dataclasses.replace(run.config,
                                     train=dataclasses.replace(run.config.train, steps=steps))
    return run


def train_run(run: Run, data: Datasets, *, hooks: TrainHooks | None = None) -> Run:
    """Train ``run`` from its current step to ``run.config.train.steps``, checkpointing as it goes.

    A run stopped at any moment and continued with this function ends bit-identical to an
    uninterrupted one (same seed, machine and thread count; the thread count is pinned to the one
    the run started with).
    """
    pin_threads(int(run.meta.get("threads", 0)))
    pin_conv(str(run.meta.get("conv", "torch")), run.path)
    cfg = run.config
    run.meta["data"] = data_summary(data)
    spec = run.spec()
    if run.state.step == 0 and "init_redraws" not in run.meta:
        probe, _ = center_crops(data.train[:8], min(cfg.data.train_crop, 64))
        run.meta["init_redraws"] = revive_dead_init(run.state, as_input(probe, spec.device),
                                                    spec.init)
    user_hooks = hooks or TrainHooks()

    def checkpoint(state: TrainState) -> None:
        save_run(run)
        if user_hooks.on_checkpoint:
            user_hooks.on_checkpoint(state)

    train_hooks = dataclasses.replace(user_hooks, on_checkpoint=checkpoint)
    if cfg.train.snapshot_every:  # small eval outputs for `selfscale visualize`
        from selfscale.snapshots import Snapshotter

        shots = Snapshotter(run.path, data.eval, cfg.train.snapshot_every)
        if run.state.step == 0:
            shots.take(run.state.model, 0)
        train_hooks = dataclasses.replace(train_hooks, every=shots.every,
                                          on_every=lambda st: shots.take(st.model, st.step))
    train(run.state, data.train, data.eval, spec, until_step=cfg.train.steps, hooks=train_hooks)
    run.meta["dead"] = is_dead(run.state.model, data.eval, spec.eval_crop, spec.device)
    save_run(run)
    if run.meta["dead"]:
        warnings.warn(f"{run.path}: the network is dead, its output is zero on every eval pixel "
                      "(the output ReLU died, so no gradient can move it); hint: lower --lr or "
                      "try another --seed", stacklevel=2)
    return run


def data_summary(data: Datasets) -> dict[str, Any]:
    return {
        "source": data.source,
        "train": list(data.train.names),
        "eval": list(data.eval.names),
        "skipped": dict(data.report.skipped),
    }


# --- the networks a run serves ------------------------------------------------------------------

def has_minimized(path: Path) -> bool:
    return (Path(path) / MIN_DIR / FINAL_FILE).is_file()


def network(run: Run, stage: str = "auto") -> tuple[FCN, str]:
    """The network ``run`` serves at ``stage`` (see :data:`STAGES`), on the run's device, and the
    stage used ("base" or "minimized")."""
    if stage not in STAGES:
        raise ConfigError(f"--stage: must be one of {', '.join(STAGES)}, got {stage!r}")
    done = has_minimized(run.path)
    if stage == "auto" and not done and (run.path / MIN_DIR / LOOP_FILE).is_file():
        raise CheckpointError(f"{run.path}: its minimization has not finished (no "
                              f"{MIN_DIR}/{FINAL_FILE}); continue it with 'selfscale minimize "
                              f"{run.path} --resume', or use --stage base")
    if stage == "base" or (stage == "auto" and not done):
        return run.state.model, "base"
    if not done:
        raise CheckpointError(f"--stage minimized: {run.path} has not been minimized "
                              f"(run 'selfscale minimize {run.path}' first)")
    return load_train_state(run.path / MIN_DIR / FINAL_FILE, run.device).model, "minimized"


def load_network(path: Path, stage: str = "auto",
                 device: str | torch.device = "cpu") -> tuple[Run, FCN, str]:
    """Load a run and the network it serves at ``stage``: (run, model, stage used)."""
    if stage not in STAGES:
        raise ConfigError(f"--stage: must be one of {', '.join(STAGES)}, got {stage!r}")
    run = load_run(path, device)
    return (run, *network(run, stage))


def load_summary(path: Path) -> dict[str, Any] | None:
    """The minimization summary of a run directory, or None when it has not been minimized."""
    file = Path(path) / MIN_DIR / SUMMARY_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"minimization summary is corrupt: {file}") from None


def run_info(run: Run, model: FCN | None = None) -> dict[str, Any]:
    """What ``selfscale info`` shows: config, task, architecture, switches, counts, scores."""
    model = run.state.model if model is None else model
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
        "conv": run.meta.get("conv", "torch"),
        "created": run.meta.get("created"),
        "data": run.meta.get("data"),
    }
