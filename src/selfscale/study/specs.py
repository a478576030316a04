"""Study specs: what a study runs and at which scale, as frozen dataclasses validated on creation.

A spec is the complete, resolved description of one study: its scale's values (``SCALES`` here
and in each study's module) with the flags given on top. It is stored in ``DIR/study.json``, and
a study directory accepts only the spec it was started with, so the same command resumes it.
Each documented field is one flag of ``selfscale study NAME`` (help from its docstring, as for the
run configs); a bad value raises :class:`ConfigError` naming the flag and the value.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfscale.config import RECIPES, MinimizeConfig, RunConfig, _check, _int, _num
from selfscale.errors import ConfigError

SCALE_NAMES = ("smoke", "laptop", "thesis")
THRESHOLDS = (0.85, 0.90, 0.95, 0.98, 1.00)
"""The thesis's thresholds (4.3, Fig 4.2)."""
STUDY_TASKS = ("sobel", "canny", "otsu")
"""Tasks a study can run: those computed from the bundled images on every worker."""
MAX_SEEDS = 1000
MAX_STEPS = 10_000_000

SCALES: dict[str, dict[str, Any]] = {
    "smoke": {"seeds": 2, "recipe": "capacity", "base_steps": 400, "train_crop": 32,
              "crop": 128, "batch": 4, "eval_every": 200, "thresholds": THRESHOLDS,
              "reference": "previous", "layers": True, "retrain_steps": 60,
              "finetune_steps": 0},
    "laptop": {"seeds": 2, "recipe": "capacity", "base_steps": 4000, "train_crop": 64,
               "crop": 256, "batch": 12, "eval_every": 500, "thresholds": THRESHOLDS,
               "reference": "previous", "layers": True, "retrain_steps": 400,
               "finetune_steps": 400},
    "thesis": {"seeds": 50, "recipe": "thesis", "base_steps": 10_000, "train_crop": 256,
               "crop": 256, "batch": 3, "eval_every": 1000, "thresholds": THRESHOLDS,
               "reference": "previous", "layers": True, "retrain_steps": 2000,
               "finetune_steps": 0},
}
"""The values every study shares, per scale. smoke: about a minute on 2 cores (tests, CI);
laptop: tens of minutes; thesis: the thesis's counts (50 runs per threshold, 10 000 base steps
with the thesis recipe, 2000 retrain steps, no fine-tune)."""


def _names(value: Any, flag: str) -> tuple[str, ...]:
    """A comma-separated string (from a flag) or a sequence → a tuple of non-empty names."""
    items = value.split(",") if isinstance(value, str) else value
    _check(isinstance(items, Iterable), flag, value, "must be a comma-separated list")
    out = tuple(str(v).strip() for v in items)
    _check(bool(out) and all(out) and len(set(out)) == len(out), flag, value,
           "must be a comma-separated list of distinct names")
    return out


def _numbers(value: Any, flag: str, kind: type) -> tuple:
    """A comma-separated string (from a flag) or a sequence → a sorted tuple of distinct
    numbers of ``kind`` (int or float)."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        out = tuple(float(v) if isinstance(v, str) else v for v in items)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag}: must be a comma-separated list of numbers, got "
                          f"{value!r}") from None
    whole = all(_num(v) and (kind is float or float(v).is_integer()) for v in out)
    _check(bool(out) and whole and len(set(out)) == len(out), flag, value,
           f"must be a comma-separated list of distinct {'integers' if kind is int else 'numbers'}")
    return tuple(sorted(kind(v) for v in out))


@dataclass(frozen=True)
class StudySpec:
    """What every study shares: the task, the scale, and how its base networks are trained."""

    study: str
    """The study's name (strategies, gridsearch, correlation)."""
    scale: str
    """--scale: smoke (about a minute on 2 cores), laptop (tens of minutes) or thesis (the
    thesis's counts); every count can be overridden by its flag (default laptop)."""
    task: str
    """--task: the operator learnt on the bundled images: sobel, canny or otsu (default sobel)."""
    seeds: int
    """--seeds: networks per cell R, trained with seeds 0..R-1 (smoke 2, laptop 2, thesis 50)."""
    recipe: str
    """--recipe: training recipe of every network (thesis scale: thesis; else capacity)."""
    base_steps: int
    """--base-steps: training steps of every network trained from scratch (smoke 400, laptop
    4000, thesis 10 000)."""
    train_crop: int
    """--train-crop: side of the training crops (smoke 32, laptop 64, thesis 256)."""
    crop: int
    """--crop: side of the evaluation centre crops (smoke 128, else 256)."""
    batch: int
    """--batch: training crops per step (smoke 4, laptop 12, thesis 3)."""
    eval_every: int
    """--eval-every: evaluate during training every N steps (smoke 200, laptop 500, thesis
    1000)."""

    def __post_init__(self) -> None:
        _check(self.scale in SCALE_NAMES, "--scale", self.scale,
               f"must be one of {', '.join(SCALE_NAMES)}")
        _check(self.task in STUDY_TASKS, "--task", self.task,
               f"must be one of {', '.join(STUDY_TASKS)}")
        _check(self.recipe in RECIPES, "--recipe", self.recipe,
               f"must be one of {', '.join(RECIPES)}")
        _check(_int(self.seeds) and 1 <= self.seeds <= MAX_SEEDS, "--seeds", self.seeds,
               f"must be an integer from 1 to {MAX_SEEDS}")
        _check(_int(self.base_steps) and 1 <= self.base_steps <= MAX_STEPS, "--base-steps",
               self.base_steps, f"must be an integer from 1 to {MAX_STEPS}")
        _check(_int(self.eval_every) and self.eval_every >= 1, "--eval-every",
               self.eval_every, "must be a positive integer")
        self.run_config((5, 5, 1), 0)  # crops, batch: checked by the run config

    def run_config(self, widths: Iterable[int], seed: int) -> dict[str, Any]:
        """The complete config of one network trained from scratch (one torch thread, CPU)."""
        return RunConfig.from_dict({
            "task": {"name": self.task},
            "data": {"crop": self.crop, "train_crop": self.train_crop, "batch": self.batch},
            "model": {"widths": list(widths)},
            "train": {"recipe": self.recipe, "steps": self.base_steps,
                      "eval_every": min(self.eval_every, self.base_steps), "seed": seed,
                      "device": "cpu", "threads": 1}}).to_dict()

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


@dataclass(frozen=True)
class MinimizingSpec(StudySpec):
    """A study that minimizes networks: thresholds and how each minimization runs."""

    thresholds: tuple[float, ...]
    """--thresholds: comma-separated thresholds (default the thesis's 0.85,0.9,0.95,0.98,1)."""
    reference: str
    """--reference: previous (the last kept score, the thesis's protocol; default) or base."""
    layers: bool
    """--layers/--no-layers: after the masks, try removing whole hidden layers (default on)."""
    retrain_steps: int
    """--retrain-steps: training steps after every alteration (smoke 60, laptop 400, thesis
    2000)."""
    finetune_steps: int
    """--finetune-steps: training steps that finish each minimized network (laptop 400, else
    0)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "thresholds", _numbers(self.thresholds, "--thresholds", float))
        _check(all(0 < t <= 1 for t in self.thresholds), "--thresholds",
               ",".join(map(str, self.thresholds)), "every threshold must be in (0, 1]")
        _check(_int(self.retrain_steps) and 1 <= self.retrain_steps <= MAX_STEPS,
               "--retrain-steps", self.retrain_steps, f"must be an integer from 1 to {MAX_STEPS}")
        _check(_int(self.finetune_steps) and 0 <= self.finetune_steps <= MAX_STEPS,
               "--finetune-steps", self.finetune_steps,
               f"must be an integer from 0 to {MAX_STEPS}")
        self.minimize_config("l1", self.thresholds[0], 0)

    def minimize_config(self, strategy: str, threshold: float, seed: int) -> dict[str, Any]:
        """The complete config of one minimization (its own seed)."""
        return MinimizeConfig(strategy=strategy, threshold=threshold, reference=self.reference,
                              layers=self.layers, retrain_steps=self.retrain_steps,
                              finetune_steps=self.finetune_steps, seed=seed).to_dict()


def check_strategies(names: tuple[str, ...], flag: str) -> None:
    from selfscale.minimize.strategies import STRATEGIES

    bad = [n for n in names if n not in STRATEGIES]
    _check(not bad, flag, ",".join(bad), "unknown strategy; choose from "
           + ", ".join(sorted(STRATEGIES)))


def resolve_spec(cls: type[StudySpec], study: str, scales: dict[str, dict[str, Any]],
                 scale: str | None, given: dict[str, Any]) -> StudySpec:
    """The spec of ``study`` at ``scale`` (default laptop) with the ``given`` values on top."""
    scale = scale or "laptop"
    _check(scale in SCALE_NAMES, "--scale", scale, f"must be one of {', '.join(SCALE_NAMES)}")
    values = {"task": "sobel", **SCALES[scale], **scales[scale], **given}
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names}, study=study, scale=scale)


def spec_difference(stored: dict[str, Any], spec: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first field where a stored spec and a new one differ: (flag, stored, new), or None."""
    for key in sorted(set(stored) | set(spec)):
        if stored.get(key) != spec.get(key):
            flag = "study" if key == "study" else "--" + key.replace("_", "-")
            return flag, stored.get(key), spec.get(key)
    return None


def shown(value: Any) -> str:
    """A spec value as a flag takes it: lists comma-separated, booleans as on/off."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def flag_args(spec: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """The flags that rebuild ``spec`` from its scale's ``defaults`` (for the report)."""
    out: list[str] = []
    for key, value in spec.items():
        if key in ("study", "scale") or defaults.get(key) == value:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        elif value is not None:
            out += [flag, shown(value)]
    return out


def path_or_none(value: Any, flag: str) -> str | None:
    if value in (None, ""):
        return None
    _check(isinstance(value, (str, Path)), flag, value, "must be a directory")
    return str(value)


# --- the studies and their trials ----------------------------------------------------------------

THESIS_WIDTHS = (5, 5, 1)
STUDIES = {"strategies": "selfscale.study.strategies", "gridsearch": "selfscale.study.gridsearch",
           "correlation": "selfscale.study.correlation"}
"""Study name → the module holding its Spec, SCALES, plan, analyse and draw."""


def study_module(name: str):
    """The module of study ``name``; an unknown name → ConfigError listing the studies."""
    import importlib

    _check(name in STUDIES, "study", name, f"must be one of {', '.join(STUDIES)}")
    return importlib.import_module(STUDIES[name])


def train_trial(spec: StudySpec, widths: Iterable[int], seed: int) -> dict[str, Any]:
    """The trial that trains a network of ``widths`` from scratch with ``seed``."""
    widths = list(widths)
    return {"id": f"train-{'x'.join(map(str, widths))}-s{seed}", "kind": "train", "seed": seed,
            "widths": widths, "config": spec.run_config(widths, seed)}


def minimize_trial(spec: MinimizingSpec, base: dict[str, Any], strategy: str,
                   threshold: float, seed: int) -> dict[str, Any]:
    """The trial that minimizes the network of trial ``base`` (it ``needs`` it)."""
    return {"id": f"min-{strategy}-t{threshold:g}-s{seed}", "kind": "minimize",
            "needs": base["id"], "seed": seed, "strategy": strategy, "threshold": threshold,
            "minimize": spec.minimize_config(strategy, threshold, seed)}
