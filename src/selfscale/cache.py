"""The array cache: one memory-mapped ``.npy`` file per image holding its input and target.

Building a data set decodes every file once and computes the target of the WHOLE image, then
stores both here. Later builds with the same files and task parameters only open those files with
``np.load(mmap_mode="r")``, so a training step does no decoding and no operator work.

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
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import skimage

from selfscale import __version__
from selfscale.errors import DataError
from selfscale.tasks import Task

CACHE_FORMAT = 1
"""Version of the cache layout and of the preprocessing; bump it to invalidate old entries."""

CACHE_ENV = "SELFSCALE_CACHE"
"""Environment variable naming the cache folder when --cache-dir is not given."""

STALE_TEMP_SECONDS = 3600
"""Temp files older than this in the cache folder are leftovers of a killed build and removed."""


def cache_folder(cache_dir: Path | None) -> Path:
    """The cache root: ``cache_dir``, else $SELFSCALE_CACHE, else $XDG_CACHE_HOME/selfscale,
    else ~/.cache/selfscale."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "selfscale"


def prepare_cache(cache_dir: Path | None) -> Path:
    """Create the entry folder ``<cache>/arrays-v{CACHE_FORMAT}`` and remove stale temp files in
    it; a folder that cannot be created is a DataError naming it."""
    folder = cache_folder(cache_dir) / f"arrays-v{CACHE_FORMAT}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"--cache-dir: cannot create the cache folder {folder}: "
                        f"{exc.strerror or exc}") from None
    remove_stale_temps(folder)
    return folder


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


def open_entry(path: Path) -> np.ndarray | None:
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


def write_entry(path: Path, arr: np.ndarray) -> np.ndarray:
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
    entry = open_entry(path)
    if entry is None:
        raise DataError(f"--cache-dir: a cache entry just written is unreadable: {path}")
    return entry


def remove_stale_temps(folder: Path) -> None:
    """Delete temp files older than :data:`STALE_TEMP_SECONDS` (left by a killed build)."""
    now = time.time()
    for tmp in folder.glob(".*.tmp"):
        try:
            if now - tmp.stat().st_mtime > STALE_TEMP_SECONDS:
                tmp.unlink()
        except OSError:
            pass
