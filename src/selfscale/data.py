"""Data sets of whole images and their targets, cached as memory-mapped arrays; crops and batches.

Building a data set decodes every file once (:func:`selfscale.images.load_gray`), computes the
target of the WHOLE image (``tasks.make_target``, or the matching file for task 'pairs'), and
stores both in one ``.npy`` file per image in a cache folder. Later builds with the same files and
task parameters only open those files with ``np.load(mmap_mode="r")``, so a training step does no
decoding and no operator work. Crops are cut from the whole arrays, so a crop's target equals the
operator applied to the whole image, then cropped (no border effects at crop edges).

Cache layout: ``<cache>/arrays-v{CACHE_FORMAT}/<sha256>.npy`` holding a float32 array of shape
``(2, H, W)``: ``[0]`` the input, ``[1]`` the target. One file per image means an entry is
written by a single atomic ``os.replace`` (never half an input/target pair) and costs one memory
map. ``<cache>`` is ``DataConfig.cache_dir``, else ``$SELFSCALE_CACHE``, else
``$XDG_CACHE_HOME/selfscale``, else ``~/.cache/selfscale``. The key (see :func:`cache_key`)
covers the file's identity (resolved path, size, mtime_ns), the task name and parameters, the
target file's identity for 'pairs', and the versions of this format, selfscale, Pillow and
scikit-image. An entry whose header, dtype, shape or length is wrong is rebuilt; the payload is
not checksummed (that would read every image at every start).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import skimage
import skimage.data
from tqdm import tqdm

from selfscale import __version__
from selfscale.config import DataConfig
from selfscale.errors import DataError
from selfscale.images import REASONS, BadImage, find_images, load_gray
from selfscale.tasks import Task, make_target

CACHE_FORMAT = 1
"""Version of the cache layout and of the preprocessing; bump it to invalidate old entries."""

CACHE_ENV = "SELFSCALE_CACHE"
"""Environment variable naming the cache folder when --cache-dir is not given."""

STALE_TEMP_SECONDS = 3600
"""Temp files older than this in the cache folder are leftovers of a killed build and removed."""

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


def cache_folder(cache_dir: Path | None) -> Path:
    """The cache root: ``cache_dir``, else $SELFSCALE_CACHE, else $XDG_CACHE_HOME/selfscale,
    else ~/.cache/selfscale."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "selfscale"


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

def _identity(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_key(path: Path, task: Task, task_params: Mapping[str, Any],
              target: Path | None = None) -> str:
    """sha256 naming the cache entry of ``path`` under ``task`` (see the module docstring)."""
    record = {
        "format": CACHE_FORMAT,
        "software": [__version__, PIL.__version__, skimage.__version__],
        "file": _identity(path),
        "task": task.name,
        "params": json.dumps(dict(task_params), sort_keys=True, default=repr),
        "target": None if target is None else _identity(target),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _open_entry(path: Path) -> np.ndarray | None:
    """The cached (2, H, W) float32 memmap, or None when absent or not a complete entry."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError):
        return None
    ok = (isinstance(arr, np.memmap) and arr.dtype == np.float32 and arr.ndim == 3
          and arr.shape[0] == 2 and arr.flags.c_contiguous and arr.offset + arr.nbytes == size)
    return arr if ok else None


def _write_entry(path: Path, arr: np.ndarray) -> np.ndarray:
    """Write atomically (a temp file in the same folder, then ``os.replace``) and reopen as a
    memmap; a failure is a DataError naming the cache folder."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"--cache-dir: cannot write to the cache folder {path.parent}: "
                        f"{exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    entry = _open_entry(path)
    if entry is None:
        raise DataError(f"--cache-dir: a cache entry just written is unreadable: {path}")
    return entry


def _remove_stale_temps(folder: Path) -> None:
    now = time.time()
    for tmp in folder.glob(".*.tmp"):
        try:
            if now - tmp.stat().st_mtime > STALE_TEMP_SECONDS:
                tmp.unlink()
        except OSError:
            pass


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
        entry = _open_entry(entry_path)
        if entry is None:
            try:
                arrays = _compute(src, task, task_params)
            except BadImage as exc:
                own._add(exc.reason, src.name)
                continue
            entry = _write_entry(entry_path, arrays)
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


def _prepare_cache(cfg: DataConfig) -> Path:
    folder = cache_folder(cfg.cache_dir) / f"arrays-v{CACHE_FORMAT}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"--cache-dir: cannot create the cache folder {folder}: "
                        f"{exc.strerror or exc}") from None
    _remove_stale_temps(folder)
    return folder


def _limit(sources: list[_Source], max_images: int | None) -> list[_Source]:
    return sources if max_images is None else sources[:max_images]


def _warn(report: LoadReport) -> None:
    if report.skipped:
        warnings.warn(report.summary(), SkippedImagesWarning, stacklevel=3)


# --- public entry points ------------------------------------------------------------------------

def load_datasets(cfg: DataConfig, task: Task, task_params: Mapping[str, Any], *,
                  progress: bool = False) -> Datasets:
    """Training and evaluation sets as ``cfg`` describes them.

    * no --data: the bundled images, split as :data:`BUNDLED_TRAIN` / :data:`BUNDLED_EVAL`;
    * --data without --eval-data: :func:`split_by_file` with --split-seed and --eval-fraction;
    * --data and --eval-data: every file of each.

    --max-images keeps the first N files (sorted) of each part. Training images must be at
    least ``cfg.effective_train_crop`` and eval images ``cfg.crop`` on both sides. Skipped files
    are counted by reason and reported by one :class:`SkippedImagesWarning`; no usable image in
    either part is a DataError.
    """
    if task.from_files:
        if cfg.data is None:
            raise DataError("--data: task 'pairs' needs --data and --targets (the bundled images "
                            "have no targets)")
        if cfg.targets is None:
            raise DataError("--targets: task 'pairs' needs a folder of target images")
        if cfg.eval_data is not None and cfg.eval_targets is None:
            raise DataError("--eval-targets: task 'pairs' with --eval-data needs the folder of "
                            "evaluation targets")
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

    folder = _prepare_cache(cfg)
    report = LoadReport()
    train, own_train = _build(train_src, cfg.effective_train_crop, task, task_params, folder,
                              report, progress, "training images")
    evals, own_eval = _build(eval_src, cfg.crop, task, task_params, folder, report, progress,
                             "eval images")
    _require(train, own_train, "training", train_where, cfg.effective_train_crop)
    _require(evals, own_eval, "eval", eval_where, cfg.crop)
    _warn(report)
    return Datasets(train=train, eval=evals, report=report, source=source)


def load_eval_set(folder: Path | None, cfg: DataConfig, task: Task,
                  task_params: Mapping[str, Any], *, targets: Path | None = None,
                  progress: bool = False) -> ImageSet:
    """Every usable image of ``folder`` as an eval set (``None``: the bundled eval images).

    Images must be at least ``cfg.crop`` on both sides; --max-images applies; task 'pairs' needs
    ``targets``. Skips are reported by one :class:`SkippedImagesWarning`.
    """
    if folder is None:
        if task.from_files:
            raise DataError("--data: task 'pairs' needs --data and --targets (the bundled images "
                            "have no targets)")
        _, paths = bundled_image_paths()
        sources = [_Source(p.name, p) for p in paths]
        where = f"the bundled images ({paths[0].parent})"
    else:
        folder = Path(folder)
        sources = _folder_sources(folder, "--data")
        where = str(folder)
        if task.from_files:
            if targets is None:
                raise DataError("--targets: task 'pairs' needs a folder of target images")
            sources = _attach_targets(sources, Path(targets), "--targets")
    sources = _limit(sources, cfg.max_images)
    report = LoadReport()
    images, own = _build(sources, cfg.crop, task, task_params, _prepare_cache(cfg), report,
                         progress, "eval images")
    _require(images, own, "eval", where, cfg.crop)
    _warn(report)
    return images


def sample_batch(images: ImageSet, rng: np.random.Generator, batch: int, crop: int,
                 flips: bool) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` random ``crop``×``crop`` crops of inputs and targets, each (N, 1, crop, crop).

    For each crop in turn, ``rng`` is consumed in this fixed order: image index
    ``rng.integers(len(images))``; top ``rng.integers(H − crop + 1)``; left
    ``rng.integers(W − crop + 1)``; then, only when ``flips``, ``rng.random() < 0.5`` for a
    horizontal flip (columns reversed) and ``rng.random() < 0.5`` for a vertical one (rows
    reversed), applied identically to input and target. A seed therefore reproduces the batches.
    """
    if not len(images):
        raise ValueError("sample_batch: the image set is empty")
    xs = np.empty((batch, 1, crop, crop), dtype=np.float32)
    ys = np.empty((batch, 1, crop, crop), dtype=np.float32)
    for i in range(batch):
        k = int(rng.integers(len(images)))
        image, target = images.inputs[k], images.targets[k]
        h, w = image.shape
        if h < crop or w < crop:
            raise ValueError(f"sample_batch: crop {crop} does not fit {images.names[k]} "
                             f"({_hw(image.shape)})")
        top = int(rng.integers(h - crop + 1))
        left = int(rng.integers(w - crop + 1))
        x = image[top:top + crop, left:left + crop]
        y = target[top:top + crop, left:left + crop]
        if flips:
            if rng.random() < 0.5:
                x, y = x[:, ::-1], y[:, ::-1]
            if rng.random() < 0.5:
                x, y = x[::-1, :], y[::-1, :]
        xs[i, 0] = x
        ys[i, 0] = y
    return xs, ys


def center_crops(images: ImageSet, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """The centre ``crop``×``crop`` of every input and target, (N, 1, crop, crop) float32.

    The crop starts at row ``(H − crop) // 2`` and column ``(W − crop) // 2``.
    """
    xs = np.empty((len(images), 1, crop, crop), dtype=np.float32)
    ys = np.empty((len(images), 1, crop, crop), dtype=np.float32)
    for i, (name, image, target) in enumerate(zip(images.names, images.inputs, images.targets)):
        h, w = image.shape
        if h < crop or w < crop:
            raise ValueError(f"center_crops: crop {crop} does not fit {name} ({_hw(image.shape)})")
        top, left = (h - crop) // 2, (w - crop) // 2
        xs[i, 0] = image[top:top + crop, left:left + crop]
        ys[i, 0] = target[top:top + crop, left:left + crop]
    return xs, ys
