"""Typed configs, one per concern (data, task, model, training), validated at construction.

Every field maps to one CLI flag; a bad value raises :class:`ConfigError` whose message names the
flag and the value received. Configs round-trip through plain dicts (``to_dict``/``from_dict``)
so a run directory can store the effective config as TOML and JSON.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfscale.errors import ConfigError

LOSSES = ("mae", "mse", "f1")
DEVICES = ("auto", "cpu", "cuda")
CONVS = ("auto", "direct", "torch")
"""--conv: the CPU convolution (selfscale.direct.MODES)."""
INITS = ("he", "trunc-normal")
SCHEDULES = ("cosine", "constant")
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "capacity": {},
    "thesis": {"data": {"batch": 3, "train_crop": None},
               "model": {"init": "trunc-normal", "init_std": 0.05},
               "train": {"steps": 10_000, "eval_every": 500, "lr": 1e-3, "schedule": "constant",
                         "clip": 0.0, "keep_best": False}},
}
"""Training presets (--recipe). ``capacity`` is the dataclass defaults: the recipe found to
train the thesis network to its capacity (README, "Training recipe"). ``thesis`` is thesis 2.3:
Adam at a constant 1e-3, truncated normal 0.05, batch 3, 256² crops. Values given in --config
or as flags override a preset's."""


def _check(ok: bool, flag: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{flag}: {rule}, got {value!r}")


def _int(value: Any) -> bool:
    """An integer that is not a bool (TOML's ``true`` must not pass for 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _path_or_none(value: Any, flag: str) -> Path | None:
    if value in (None, ""):
        return None
    _check(isinstance(value, (str, Path)), flag, value, "must be a path")
    return Path(value)


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are cut into network inputs."""

    data: Path | None = None
    """--data: folder of images searched recursively; default: the bundled scikit-image samples."""
    eval_data: Path | None = None
    """--eval-data: folder of evaluation images; default: a seeded split of --data by file."""
    targets: Path | None = None
    """--targets: for task 'pairs', folder of target images whose names match --data's."""
    eval_targets: Path | None = None
    """--eval-targets: for task 'pairs' with --eval-data, the evaluation targets."""
    crop: int = 256
    """--crop: side of the centre crop used for evaluation (thesis: 256)."""
    train_crop: int | None = 64
    """--train-crop: side of the random training crops (thesis: 256, as --crop); None (in code
    and presets) means the same as --crop."""
    batch: int = 3
    """--batch: training crops per step (thesis: 3, of 256² crops)."""
    flips: bool = False
    """--flips: random horizontal and vertical flips of training crops."""
    eval_fraction: float = 0.2
    """--eval-fraction: share of --data files held out for evaluation when --eval-data is absent."""
    split_seed: int = 0
    """--split-seed: seed of the train/eval split by file (independent of the training seed)."""
    max_images: int | None = None
    """--max-images: use at most this many files of each split (the first ones in sorted order)."""
    cache_dir: Path | None = None
    """--cache-dir: where decoded inputs and targets are cached; default: $SELFSCALE_CACHE or
    ~/.cache/selfscale."""

    def __post_init__(self) -> None:
        for name in ("data", "eval_data", "targets", "eval_targets", "cache_dir"):
            object.__setattr__(self, name, _path_or_none(getattr(self, name),
                                                         "--" + name.replace("_", "-")))
        _check(isinstance(self.flips, bool), "--flips", self.flips, "must be true or false")
        _check(_int(self.crop) and 8 <= self.crop <= 8192, "--crop", self.crop,
               "must be an integer between 8 and 8192")
        if self.train_crop is None:  # stored as the value it stands for (TOML has no null)
            object.__setattr__(self, "train_crop", self.crop)
        _check(_int(self.train_crop) and 8 <= self.train_crop <= 8192, "--train-crop",
               self.train_crop, "must be an integer between 8 and 8192")
        _check(_int(self.batch) and 1 <= self.batch <= 4096, "--batch", self.batch,
               "must be an integer between 1 and 4096")
        _check(_num(self.eval_fraction) and 0 < self.eval_fraction < 1,
               "--eval-fraction", self.eval_fraction, "must be between 0 and 1 (exclusive)")
        _check(_int(self.split_seed) and self.split_seed >= 0, "--split-seed",
               self.split_seed, "must be a non-negative integer")
        if self.max_images is not None:
            _check(_int(self.max_images) and self.max_images >= 1, "--max-images",
                   self.max_images, "must be a positive integer")
        _check(self.eval_targets is None or self.eval_data is not None, "--eval-targets",
               str(self.eval_targets), "needs --eval-data")


@dataclass(frozen=True)
class TaskConfig:
    """Which operator the network learns, with every parameter of that operator."""

    name: str = "sobel"
    """--task: sobel, canny, otsu or pairs."""
    params: dict[str, Any] = field(default_factory=dict)
    """--task-param KEY=VALUE: overrides of the operator's parameters (all stored with the run)."""

    def __post_init__(self) -> None:
        _check(isinstance(self.name, str) and bool(self.name), "--task", self.name,
               "must be a task name")
        _check(isinstance(self.params, dict), "--task-param", self.params, "must be KEY=VALUE pairs")


@dataclass(frozen=True)
class ModelConfig:
    """The fully convolutional network: widths per layer, kernel size, initialization."""

    widths: tuple[int, ...] = (5, 5, 1)
    """--widths: masks (output channels) per layer; the last is the output layer (thesis: 5,5,1)."""
    kernel: int = 5
    """--kernel: odd side of every square mask (thesis: 5)."""
    in_channels: int = 1
    """Input channels (grayscale: 1)."""
    init: str = "he"
    """--init: he (weights from N(0, 2/fan_in) truncated at 2 std, biases --init-bias) or
    trunc-normal (the thesis: weights and biases from a normal with --init-std, truncated at 2
    std)."""
    init_std: float = 0.05
    """--init-std: standard deviation of the trunc-normal initialization (thesis: 0.05)."""
    init_bias: float = 0.01
    """--init-bias: the value of every bias under --init he."""

    def __post_init__(self) -> None:
        _check(self.init in INITS, "--init", self.init, f"must be one of {', '.join(INITS)}")
        _check(_num(self.init_bias) and abs(self.init_bias) < 10, "--init-bias",
               self.init_bias, "must be a number between -10 and 10")
        _check(isinstance(self.widths, (list, tuple)), "--widths", self.widths,
               "must be a list of integers such as [5, 5, 1]")
        object.__setattr__(self, "widths", tuple(self.widths))
        _check(len(self.widths) >= 1 and all(_int(w) and 1 <= w <= 4096
                                             for w in self.widths),
               "--widths", ",".join(map(str, self.widths)),
               "must be comma-separated positive integers, e.g. 5,5,1")
        _check(self.widths[-1] == 1, "--widths", ",".join(map(str, self.widths)),
               "the last layer produces the output image and must have width 1")
        _check(_int(self.kernel) and self.kernel >= 1 and self.kernel % 2 == 1
               and self.kernel <= 63, "--kernel", self.kernel, "must be an odd integer from 1 to 63")
        _check(_int(self.in_channels) and self.in_channels >= 1, "in_channels",
               self.in_channels, "must be a positive integer")
        _check(_num(self.init_std) and 0 < self.init_std < 10, "--init-std",
               self.init_std, "must be a positive number below 10")


@dataclass(frozen=True)
class TrainConfig:
    """The optimizer, the length of training and how often it is evaluated."""

    recipe: str = "capacity"
    """--recipe: a preset of training settings: capacity (the defaults: the recipe that trains
    the thesis network to its capacity) or thesis (Adam at a constant 1e-3, truncated normal
    0.05, batch 3, 256² crops, thesis 2.3). --config values and flags override single settings."""
    steps: int = 110_000
    """--steps: training steps (one batch each) in total (thesis: 10 000 of 256² × 3 crops;
    110 000 of 64² × 3 take about as long)."""
    eval_every: int = 5000
    """--eval-every: evaluate on the whole eval set every N steps (and at the end)."""
    loss: str | None = None
    """--loss: mae, mse or f1 (soft F1 loss E/(2TP+E), thesis 2.3.1); default: the task's
    default (mae for continuous targets, mse for binary ones), fixed when the run starts."""
    lr: float = 3e-3
    """--lr: Adam learning rate (the peak of the cosine schedule; thesis: 1e-3 constant)."""
    schedule: str = "cosine"
    """--schedule: cosine (linear warm-up over the first --warmup of the steps, then cosine decay
    to 1% of --lr; a retrain restarts it for its own length) or constant (the thesis)."""
    warmup: float = 0.05
    """--warmup: share of the steps used for the linear warm-up of the cosine schedule."""
    clip: float = 0.0
    """--clip: clip the gradient norm to this value; 0 means no clipping."""
    keep_best: bool = False
    """--keep-best: at the end of training, keep the weights of the evaluation with the best F1
    (thesis 2.4.2's 'best') instead of the last ones."""
    stop_after: int = 0
    """--stop-after: stop early when the eval F1 has not improved for this many evaluations
    (thesis 2.4.2); 0 means never."""
    seed: int = 0
    """--seed: seeds initialization and batch sampling; same seed, machine and threads give the
    same weights."""
    device: str = "auto"
    """--device: auto (CUDA when present), cpu or cuda."""
    threads: int = 0
    """--threads: CPU threads for torch; 0 means torch's default. Results are only bit-identical
    at the same thread count."""
    conv: str = "auto"
    """--conv: CPU convolution: direct (selfscale's kernels for narrow layers, compiled on first
    use, with a whole training step in one call; about 3x faster), torch (PyTorch's), or auto
    (direct when a C++ compiler builds it). Fixed when the run starts; the two agree to float
    rounding."""
    checkpoint_every: int = 0
    """--checkpoint-every: also save the run state every N steps; 0 means at every evaluation."""
    snapshot_every: int = 0
    """--snapshot-every: every N steps (and at step 0) store the network's output for small
    centre crops of the eval images in RUN_DIR/snapshots/, for 'selfscale visualize'; 0 (the
    default) stores none."""

    def __post_init__(self) -> None:
        _check(_int(self.steps) and self.steps >= 0, "--steps", self.steps,
               "must be a non-negative integer")
        _check(_int(self.eval_every) and self.eval_every >= 1, "--eval-every",
               self.eval_every, "must be a positive integer")
        _check(self.loss is None or self.loss in LOSSES, "--loss", self.loss,
               f"must be one of {', '.join(LOSSES)}")
        _check(_num(self.lr) and math.isfinite(self.lr) and 0 < self.lr <= 10,
               "--lr", self.lr, "must be a positive number up to 10")
        _check(_int(self.seed) and 0 <= self.seed < 2**63, "--seed", self.seed,
               "must be a non-negative integer")
        _check(self.device in DEVICES, "--device", self.device,
               f"must be one of {', '.join(DEVICES)}")
        _check(_int(self.threads) and 0 <= self.threads <= 1024, "--threads",
               self.threads, "must be an integer from 0 to 1024")
        _check(self.conv in CONVS, "--conv", self.conv, f"must be one of {', '.join(CONVS)}")
        _check(_int(self.checkpoint_every) and self.checkpoint_every >= 0,
               "--checkpoint-every", self.checkpoint_every, "must be a non-negative integer")
        _check(_int(self.snapshot_every) and self.snapshot_every >= 0, "--snapshot-every",
               self.snapshot_every, "must be a non-negative integer")
        _check(self.recipe in RECIPES, "--recipe", self.recipe,
               f"must be one of {', '.join(RECIPES)}")
        _check(self.schedule in SCHEDULES, "--schedule", self.schedule,
               f"must be one of {', '.join(SCHEDULES)}")
        _check(_num(self.warmup) and 0 <= self.warmup <= 0.5, "--warmup", self.warmup,
               "must be a number from 0 to 0.5")
        _check(_num(self.clip) and 0 <= self.clip < 1e6, "--clip", self.clip,
               "must be a non-negative number")
        _check(isinstance(self.keep_best, bool), "--keep-best", self.keep_best,
               "must be true or false")
        _check(_int(self.stop_after) and self.stop_after >= 0, "--stop-after", self.stop_after,
               "must be a non-negative integer")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run; stored in the run directory."""

    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/TOML-friendly dict (paths as strings, None values left out)."""
        out: dict[str, Any] = {}
        for section in dataclasses.fields(self):
            sub = getattr(self, section.name)
            out[section.name] = {
                f.name: _plain(getattr(sub, f.name))
                for f in dataclasses.fields(sub)
                if getattr(sub, f.name) is not None
            }
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        """Build and validate from a dict such as a parsed config.toml; unknown keys are errors."""
        sections = {"data": DataConfig, "task": TaskConfig, "model": ModelConfig,
                    "train": TrainConfig}
        if not isinstance(raw, dict):
            raise ConfigError(f"config: expected tables [data] [task] [model] [train], got {raw!r}")
        train = raw.get("train", {})
        recipe = train.get("recipe", TrainConfig.recipe) if isinstance(train, dict) else None
        if recipe in RECIPES:  # the preset sits below the values given; bad names fail below
            raw = merge_sections(RECIPES[recipe], raw)
        unknown = set(raw) - set(sections)
        if unknown:
            raise ConfigError(f"config: unknown section(s) {sorted(unknown)}; "
                              f"expected {sorted(sections)}")
        built = {}
        for name, klass in sections.items():
            if not isinstance(raw.get(name, {}), dict):
                raise ConfigError(f"config: [{name}] must be a table, got {raw[name]!r}")
            values = dict(raw.get(name, {}))
            known = {f.name for f in dataclasses.fields(klass)}
            bad = set(values) - known
            if bad:
                raise ConfigError(f"config: unknown key(s) {sorted(bad)} in [{name}]; "
                                  f"expected some of {sorted(known)}")
            try:
                built[name] = klass(**values)
            except TypeError as exc:  # pragma: no cover - defensive, dataclass signature errors
                raise ConfigError(f"config: [{name}]: {exc}") from None
        return cls(**built)


def merge_sections(*layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Two-level dicts ``{section: {key: value}}`` merged left to right (later layers win);
    nested ``params`` tables are merged key by key too. A section that is not a table is a
    ConfigError."""
    out: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section, values in layer.items():
            if not isinstance(values, dict):
                raise ConfigError(f"config: {section!r} must be a table like [{section}]")
            merged = out.setdefault(section, {})
            for key, value in values.items():
                if key == "params" and isinstance(value, dict):
                    value = {**merged.get("params", {}), **value}
                merged[key] = value
    return out


def config_diff(a: RunConfig, b: RunConfig) -> list[tuple[str, str, Any, Any]]:
    """``(section, field, value in a, value in b)`` for every field where two configs differ."""
    return [(sec.name, f.name, getattr(getattr(a, sec.name), f.name),
             getattr(getattr(b, sec.name), f.name))
            for sec in dataclasses.fields(a)
            for f in dataclasses.fields(getattr(a, sec.name))
            if getattr(getattr(a, sec.name), f.name) != getattr(getattr(b, sec.name), f.name)]


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


MINIMIZE_RECIPES: dict[str, dict[str, int]] = {
    "capacity": {},
    "thesis": {"retrain_steps": 2000, "finetune_steps": 5000},
}
"""Per training recipe, the minimization defaults that differ from :class:`MinimizeConfig`'s. A
retrain step is a step of the run's own recipe, so its length follows the recipe: 7000 capacity
steps (3 crops of 64²) take about as long as selfscale 0.2.0's 2000 steps of 12 crops; a
thesis step (3 crops of 256²) is 4× longer, and the thesis retrained 2000 of them."""


def minimize_config_for(recipe: str, given: dict[str, Any]) -> "MinimizeConfig":
    """The MinimizeConfig for a run of ``recipe``: the values ``given`` (flags), else the
    recipe's defaults (:data:`MINIMIZE_RECIPES`), else the dataclass defaults."""
    return MinimizeConfig(**(MINIMIZE_RECIPES.get(recipe, {}) | given))


MODES = ("disabled-frozen", "disabled", "others-frozen")
REFERENCES = ("base", "previous")
SCORE_METRICS = ("f1", "uiqi", "mae", "mse")
JUDGES = ("final", "best", "paired")
CHOICES = {"--loss": LOSSES, "--device": DEVICES, "--conv": CONVS, "--mode": MODES,
           "--reference": REFERENCES, "--metric": SCORE_METRICS, "--init": INITS,
           "--schedule": SCHEDULES, "--recipe": tuple(RECIPES), "--judge": JUDGES}
"""The allowed values of the flags that take one of a few names."""


@dataclass(frozen=True)
class MinimizeConfig:
    """The minimization process (thesis 2.4.2): what is tried, how long, and what counts as ok."""

    strategy: str = "l1"
    """--strategy: selection strategy (see `selfscale minimize --help` for the list)."""
    threshold: float = 0.95
    """--threshold: keep a change if score_new >= threshold × reference (thesis: 0.85–1.00)."""
    retrain_steps: int = 7000
    """--retrain-steps: training steps after every alteration; default 7000 for a run of the
    capacity recipe (as long as 2000 steps of 12 crops) and the thesis's 2000 for --recipe
    thesis."""
    base_steps: int | None = None
    """--base-steps: first train the run up to this many steps (default: use it as it is)."""
    mode: str = "disabled-frozen"
    """--mode: how a mask's worth is tested (thesis 2.4.1); only disabled-frozen removes masks."""
    reference: str = "base"
    """--reference: base (the base network's score) or previous (the last kept score, thesis)."""
    layers: bool = True
    """--layers/--no-layers: after the masks, try removing whole hidden layers."""
    max_steps: int | None = None
    """--max-steps: at most this many minimization steps (decisions) in total."""
    metric: str = "f1"
    """--metric: the eval score compared against the threshold (f1, uiqi, mae or mse)."""
    patience: int = 2
    """--patience: ranked strategies stop after this many consecutive step-backs (thesis: 2)."""
    random_steps: int = 10
    """--random-steps: the random strategy stops after this many steps (thesis: 10)."""
    oracle_steps: int = 200
    """--oracle-steps: short retrain the oracle strategy uses to try each mask."""
    judge: str = "final"
    """--judge: how a retrained change is judged: final (its score at the retrain's end against
    the reference, the thesis's fixed mode), best (the best of 4 evaluations during the retrain,
    whose weights are kept: the thesis's 'best') or paired (its final score against the
    unchanged network retrained as long on the same batches, times the unchanged network's own
    ratio to the reference)."""
    abort_below: float = 0.7
    """--abort-below: a retrain is evaluated every quarter of its steps, and one whose ratio to
    the reference is below this share of the threshold at an evaluation from a quarter in (before
    its end) stops there and is stepped back, saving the rest of its steps (a hopeless change,
    such as most layer removals); 0 never stops early."""
    free_below: float = 0.999
    """--free-below: masks that output zero on at least this share of training pixels are tried
    first, without a retrain (free removals); above 1 turns this off."""
    finetune_steps: int = 17_500
    """--finetune-steps: after the last decision, train the minimized network this many steps
    with the run's recipe (the schedule restarted); kept only if the score does not fall. Skipped
    when no change was kept; 0 skips it; default 17 500 for a run of the capacity recipe (as
    long as 5000 steps of 12 crops), 5000 for --recipe thesis."""
    reinit: bool = True
    """--reinit/--no-reinit: in modes disabled / others-frozen, redraw the tested mask from the
    initial distribution (the thesis's reinitialize); --no-reinit zeroes it instead, and a zeroed
    ReLU mask cannot relearn (it is reported dead and removed)."""
    seed: int = 0
    """--seed: seed of the minimization's own random choices (random strategy, re-inits)."""

    def __post_init__(self) -> None:
        _check(_num(self.threshold) and 0 < self.threshold <= 1,
               "--threshold", self.threshold, "must be in (0, 1]")
        _check(_int(self.retrain_steps) and self.retrain_steps >= 1, "--retrain-steps",
               self.retrain_steps, "must be a positive integer")
        if self.base_steps is not None:
            _check(_int(self.base_steps) and self.base_steps >= 0, "--base-steps",
                   self.base_steps, "must be a non-negative integer")
        _check(self.mode in MODES, "--mode", self.mode, f"must be one of {', '.join(MODES)}")
        _check(self.reference in REFERENCES, "--reference", self.reference,
               f"must be one of {', '.join(REFERENCES)}")
        if self.max_steps is not None:
            _check(_int(self.max_steps) and self.max_steps >= 0, "--max-steps",
                   self.max_steps, "must be a non-negative integer")
        _check(self.metric in SCORE_METRICS, "--metric", self.metric,
               f"must be one of {', '.join(SCORE_METRICS)}")
        _check(_int(self.patience) and self.patience >= 1, "--patience", self.patience,
               "must be a positive integer")
        _check(_int(self.random_steps) and self.random_steps >= 1, "--random-steps",
               self.random_steps, "must be a positive integer")
        _check(_int(self.oracle_steps) and self.oracle_steps >= 0, "--oracle-steps",
               self.oracle_steps, "must be a non-negative integer")
        _check(_int(self.seed) and self.seed >= 0, "--seed", self.seed,
               "must be a non-negative integer")
        _check(self.judge in JUDGES, "--judge", self.judge,
               f"must be one of {', '.join(JUDGES)}")
        _check(_num(self.abort_below) and 0 <= self.abort_below < 1, "--abort-below",
               self.abort_below, "must be a number from 0 to below 1")
        _check(_num(self.free_below) and 0 < self.free_below, "--free-below", self.free_below,
               "must be a positive number (above 1: no free removals)")
        _check(_int(self.finetune_steps) and self.finetune_steps >= 0, "--finetune-steps",
               self.finetune_steps, "must be a non-negative integer")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}
