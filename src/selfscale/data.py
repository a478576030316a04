"""Image sources and the train/eval split: whole images and their targets as memory maps.

Building a data set finds the files (the bundled split, a --data folder split by
:func:`split_by_file`, or --data and --eval-data), decodes each once
(:func:`selfscale.images.load_gray`), computes the target of the WHOLE image
(``tasks.make_target``, or the matching file under --targets for task 'pairs') and keeps both in
the array cache (:mod:`selfscale.cache`), so later builds only open memory maps. Files that
cannot be used are skipped by reason and reported once.
"""

from __future__ import annotations

import hashlib
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import skimage
import skimage.data
from tqdm import tqdm

from selfscale.cache import cache_key, open_entry, prepare_cache, write_entry
from selfscale.config import DataConfig
from selfscale.errors import ConfigError, DataError
from selfscale.images import REASONS, BadImage, find_images, load_gray
from selfscale.tasks import Task, make_target

BUNDLED_TRAIN = (
    "astronaut.png", "brick.png", "cell.png", "chelsea.png", "clock_motion.png", "grass.png",
    "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png", "retina.jpg",
    "rocket.jpg",
)
"""Training images of the bundled set: the natural photographs shipped inside scikit-image
(``skimage/data``), at least 300 px on each side so the default 256 crop fits every one.
Left out: the synthetic ones (chessboard_*, color, logo, phantom), horse (a binary silhouette),
microaneurysms (102×102), page (191×384) and text (172×448) (too small for the default crop: they
would make every default run warn), motorcycle_right (the stereo twin of motorcycle_left)."""

BUNDLED_EVAL = ("camera.png", "coffee.png", "coins.png", "gravel.png")
"""Evaluation images of the bundled set, never cropped for training: a grayscale portrait with
sky and grass (camera), a colour still life (coffee), many small round objects (coins) and a
dense stochastic texture (gravel); brick and grass keep textures in training too."""


@dataclass
class ImageSet:
    """Whole images and their targets, index-aligned; arrays are 2-D float32 (memory maps)."""

    names: list[str]
    """Path relative to the data folder (POSIX separators), or the bundled file name."""
    inputs: list[np.ndarray]
    """Grayscale inputs in [0, 1]."""
    targets: list[np.ndarray]
    """Targets in [0, 1], each the shape of its input."""
    held: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)
    """What is made from the whole set once and kept with it (its centre crops:
    :func:`selfscale.crops.center_crop_chunks`); a sub-set starts empty."""

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: slice) -> ImageSet:
        """A sub-set by slice, e.g. ``images[:8]`` (the arrays are shared, not copied)."""
        return ImageSet(self.names[index], self.inputs[index], self.targets[index])

    def chunks(self, size: int) -> Iterator[ImageSet]:
        """Consecutive sub-sets of at most ``size`` images."""
        for start in range(0, len(self), size):
            yield self[start:start + size]


@dataclass
class LoadReport:
    """What one build found, used, skipped (by reason) and took from the cache."""

    n_found: int = 0
    """Image files considered (after --max-images)."""
    n_used: int = 0
    """Images in the returned sets."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Number of skipped files per reason (see :data:`selfscale.images.REASONS`)."""
    first_skipped: dict[str, str] = field(default_factory=dict)
    """Name of the first file skipped for each reason."""
    cache_hits: int = 0
    """Images whose arrays came from the cache without decoding."""

    def summary(self) -> str:
        """One line: ``skipped 3 of 20 images: 2 truncated (first: a.jpg), 1 too-small (first:
        b.png)``, or ``used 20 of 20 images (20 from cache)`` when nothing was skipped."""
        n_skipped = sum(self.skipped.values())
        if not n_skipped:
            return f"used {self.n_used} of {self.n_found} images ({self.cache_hits} from cache)"
        return f"skipped {n_skipped} of {self.n_found} images: {_reason_counts(self, True)}"

    def _add(self, reason: str, name: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.first_skipped.setdefault(reason, name)


@dataclass
class Datasets:
    """The training and evaluation images of one run and how they were obtained."""

    train: ImageSet
    eval: ImageSet
    report: LoadReport
    source: str
    """``"bundled"`` or the --data folder."""


class SkippedImagesWarning(UserWarning):
    """Emitted once per build when some image files were skipped."""


@dataclass(frozen=True)
class _Source:
    name: str
    path: Path
    target: Path | None = None  # task 'pairs': the matching target file
    missing: str | None = None  # task 'pairs': why no target file was found


# --- where the files are ------------------------------------------------------------------------

def bundled_image_paths() -> tuple[list[Path], list[Path]]:
    """Paths of the bundled (train, eval) images inside the installed scikit-image."""
    folder = Path(skimage.data.__file__).parent
    train = [folder / name for name in BUNDLED_TRAIN]
    evals = [folder / name for name in BUNDLED_EVAL]
    missing = [p.name for p in train + evals if not p.is_file()]
    if missing:
        raise DataError(f"the bundled sample images {', '.join(missing)} are missing from "
                        f"{folder} (scikit-image {skimage.__version__}); pass --data")
    return train, evals


def split_by_file(names: list[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic (train, eval) split of file names, each part sorted.

    Every name is ranked by ``sha256(f"{seed}:{name}")``; the first ``round(n · eval_fraction)``
    (at least 1, at most n − 1) are eval. The split depends only on the names and the seed, not
    on their order or on the folder's location; adding a file moves at most one other file
    between the parts. Needs at least 2 names.
    """
    if len(names) < 2:
        raise ValueError(f"need at least 2 files to split, got {len(names)}")
    n_eval = min(max(round(len(names) * eval_fraction), 1), len(names) - 1)
    ranked = sorted(names, key=lambda n: hashlib.sha256(f"{seed}:{n}".encode()).hexdigest())
    chosen = set(ranked[:n_eval])
    return sorted(n for n in names if n not in chosen), sorted(chosen)


def _folder_sources(root: Path, flag: str) -> list[_Source]:
    if not root.exists():
        raise DataError(f"{flag}: folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"{flag}: not a folder: {root}")
    paths = find_images(root)
    if not paths:
        raise DataError(f"{flag}: no image files (.png, .jpg, .jpeg, .tif, .tiff, .bmp, .webp) "
                        f"found in {root}")
    return [_Source(p.relative_to(root).as_posix(), p) for p in paths]


def _attach_targets(sources: list[_Source], targets: Path, flag: str) -> list[_Source]:
    """Task 'pairs': the target of ``<rel>/<stem>.<ext>`` is ``targets/<rel>/<stem>.<any ext>``."""
    if not targets.is_dir():
        raise DataError(f"{flag}: target folder not found: {targets}")
    by_stem: dict[str, list[Path]] = {}
    for path in find_images(targets):
        rel = path.relative_to(targets)
        by_stem.setdefault(rel.with_suffix("").as_posix(), []).append(path)
    out = []
    for src in sources:
        stem = str(Path(src.name).with_suffix("").as_posix())
        found = by_stem.get(stem, [])
        if len(found) == 1:
            out.append(_Source(src.name, src.path, target=found[0]))
        elif not found:
            out.append(_Source(src.name, src.path, missing=f"no file {stem}.* in {targets}"))
        else:
            names = ", ".join(p.name for p in found)
            out.append(_Source(src.name, src.path, missing=f"ambiguous targets: {names}"))
    return out


# --- building one set ---------------------------------------------------------------------------

def _compute(src: _Source, task: Task, task_params: Mapping[str, Any]) -> np.ndarray:
    """Decode the input and make its target; BadImage when either cannot be used."""
    image = load_gray(src.path)
    if src.target is not None:
        try:
            target = load_gray(src.target)
        except BadImage as exc:
            raise BadImage(exc.reason, f"target {exc}", src.target) from None
        if target.shape != image.shape:
            raise BadImage("size-mismatch", f"{src.path}: input is {_hw(image.shape)} but target "
                                            f"{src.target} is {_hw(target.shape)}", src.path)
    else:
        target = make_target(task, image, task_params)
        if target.shape != image.shape:
            raise ValueError(f"task '{task.name}' returned shape {target.shape} for an image of "
                             f"shape {image.shape}")
    return np.stack([image, target]).astype(np.float32, copy=False)


def _hw(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}×{shape[0]}"


def _build(sources: list[_Source], min_side: int, task: Task, task_params: Mapping[str, Any],
           folder: Path, report: LoadReport, progress: bool,
           label: str) -> tuple[ImageSet, LoadReport]:
    """Load ``sources`` (from the cache where possible); returns the set and this set's skips."""
    names: list[str] = []
    inputs: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    own = LoadReport(n_found=len(sources))
    for src in tqdm(sources, desc=f"loading {label}", unit="img", disable=not progress,
                    file=sys.stderr, leave=False):
        if src.missing is not None:
            own._add("no-target", src.name)
            continue
        try:
            entry_path = folder / f"{cache_key(src.path, task, task_params, src.target)}.npy"
        except OSError:  # vanished or inaccessible since the folder was listed
            own._add("unreadable", src.name)
            continue
        entry = open_entry(entry_path)
        if entry is None:
            try:
                arrays = _compute(src, task, task_params)
            except BadImage as exc:
                own._add(exc.reason, src.name)
                continue
            entry = write_entry(entry_path, arrays)
        else:
            own.cache_hits += 1
        if min(entry.shape[1:]) < min_side:
            own._add("too-small", src.name)
            continue
        names.append(src.name)
        inputs.append(entry[0])
        targets.append(entry[1])
    own.n_used = len(names)
    report.n_found += own.n_found
    report.n_used += own.n_used
    report.cache_hits += own.cache_hits
    for reason in REASONS:
        if reason in own.skipped:
            report.skipped[reason] = report.skipped.get(reason, 0) + own.skipped[reason]
            report.first_skipped.setdefault(reason, own.first_skipped[reason])
    return ImageSet(names, inputs, targets), own


def _reason_counts(report: LoadReport, with_first: bool) -> str:
    order = sorted(report.skipped, key=lambda r: (-report.skipped[r], REASONS.index(r)))
    parts = []
    for reason in order:
        part = f"{report.skipped[reason]} {reason}"
        if with_first:
            part += f" (first: {report.first_skipped[reason]})"
        parts.append(part)
    return ", ".join(parts)


def _require(images: ImageSet, own: LoadReport, what: str, where: str, min_side: int) -> None:
    if len(images):
        return
    detail = f": {_reason_counts(own, False)}" if own.skipped else ""
    hint = f" (images must be at least {min_side}×{min_side})" if "too-small" in own.skipped else ""
    raise DataError(f"no usable {what} images in {where}: {own.n_found} found{detail}{hint}")



def _limit(sources: list[_Source], max_images: int | None) -> list[_Source]:
    return sources if max_images is None else sources[:max_images]


def _warn(report: LoadReport) -> None:
    if report.skipped:
        warnings.warn(report.summary(), SkippedImagesWarning, stacklevel=3)


def _require_targets(task: Task, data: Path | None, targets: Path | None,
                     eval_data: Path | None = None, eval_targets: Path | None = None) -> None:
    """Task 'pairs' reads its targets from files: it needs --targets, --data (the bundled images
    have none) and, with --eval-data, --eval-targets. The only place this rule is checked."""
    if not task.from_files:
        return
    if targets is None:
        raise ConfigError("--targets: task 'pairs' needs a folder of target images")
    if data is None:
        raise ConfigError("--data: task 'pairs' needs --data and --targets (the bundled images "
                          "have no targets)")
    if eval_data is not None and eval_targets is None:
        raise ConfigError("--eval-targets: task 'pairs' with --eval-data needs the folder of "
                          "evaluation targets")


# --- public entry points ------------------------------------------------------------------------

def load_datasets(cfg: DataConfig, task: Task, task_params: Mapping[str, Any], *,
                  progress: bool = False) -> Datasets:
    """Training and evaluation sets as ``cfg`` describes them.

    * no --data: the bundled images, split as :data:`BUNDLED_TRAIN` / :data:`BUNDLED_EVAL`;
    * --data without --eval-data: :func:`split_by_file` with --split-seed and --eval-fraction;
    * --data and --eval-data: every file of each.

    --max-images keeps the first N files (sorted) of each part. Training images must be at
    least ``cfg.train_crop`` and eval images ``cfg.crop`` on both sides. Skipped files
    are counted by reason and reported by one :class:`SkippedImagesWarning`; no usable image in
    either part is a DataError; task 'pairs' without its target folders is a ConfigError.
    """
    _require_targets(task, cfg.data, cfg.targets, cfg.eval_data, cfg.eval_targets)
    if cfg.data is None:
        source = "bundled"
        train_paths, eval_paths = bundled_image_paths()
        train_src = [_Source(p.name, p) for p in train_paths]
        eval_src = [_Source(p.name, p) for p in eval_paths]
        train_where = eval_where = f"the bundled images ({train_paths[0].parent})"
    else:
        source = str(cfg.data)
        train_src = _folder_sources(cfg.data, "--data")
        train_where = eval_where = str(cfg.data)
        if task.from_files:
            train_src = _attach_targets(train_src, cfg.targets, "--targets")
        if cfg.eval_data is None:
            if len(train_src) < 2:
                raise DataError(f"--data: {cfg.data} holds {len(train_src)} image file; a split "
                                f"into train and eval needs at least 2 (or pass --eval-data)")
            by_name = {s.name: s for s in train_src}
            train_names, eval_names = split_by_file(list(by_name), cfg.eval_fraction,
                                                    cfg.split_seed)
            train_src = [by_name[n] for n in train_names]
            eval_src = [by_name[n] for n in eval_names]
    if cfg.eval_data is not None:
        eval_src = _folder_sources(cfg.eval_data, "--eval-data")
        eval_where = str(cfg.eval_data)
        if task.from_files:
            eval_src = _attach_targets(eval_src, cfg.eval_targets, "--eval-targets")
    train_src = _limit(train_src, cfg.max_images)
    eval_src = _limit(eval_src, cfg.max_images)

    folder = prepare_cache(cfg.cache_dir)
    report = LoadReport()
    train, own_train = _build(train_src, cfg.train_crop, task, task_params, folder,
                              report, progress, "training images")
    evals, own_eval = _build(eval_src, cfg.crop, task, task_params, folder, report, progress,
                             "eval images")
    _require(train, own_train, "training", train_where, cfg.train_crop)
    _require(evals, own_eval, "eval", eval_where, cfg.crop)
    _warn(report)
    return Datasets(train=train, eval=evals, report=report, source=source)


def load_eval_set(folder: Path | None, cfg: DataConfig, task: Task,
                  task_params: Mapping[str, Any], *, targets: Path | None = None,
                  progress: bool = False) -> ImageSet:
    """Every usable image of ``folder`` as an eval set (``None``: the bundled eval images).

    Images must be at least ``cfg.crop`` on both sides; --max-images applies; task 'pairs' needs
    ``targets`` (else a ConfigError). Skips are reported by one :class:`SkippedImagesWarning`.
    """
    _require_targets(task, folder, targets)
    if folder is None:
        _, paths = bundled_image_paths()
        sources = [_Source(p.name, p) for p in paths]
        where = f"the bundled images ({paths[0].parent})"
    else:
        folder = Path(folder)
        sources = _folder_sources(folder, "--data")
        where = str(folder)
        if task.from_files:
            sources = _attach_targets(sources, Path(targets), "--targets")
    sources = _limit(sources, cfg.max_images)
    report = LoadReport()
    images, own = _build(sources, cfg.crop, task, task_params, prepare_cache(cfg.cache_dir),
                         report, progress, "eval images")
    _require(images, own, "eval", where, cfg.crop)
    _warn(report)
    return images

