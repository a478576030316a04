"""Atomic saving and safe loading of state files (a run's whole state is one dict of tensors).

Writing: temp file in the same directory → flush → fsync → ``os.replace`` → fsync the directory,
so a kill at any moment leaves either the old file or the new one, never a torn one. A sha256
of the bytes is stored beside the file (``NAME.sha256``) and checked on load, so a flipped byte is
reported as "corrupt" instead of loading garbage.

Loading uses ``torch.load(weights_only=True)``: only tensors, numbers, strings, lists, tuples and
dicts are rebuilt; a pickle payload that would run code raises instead (see REFERENCE.md).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from selfscale.errors import CheckpointError

TMP_PREFIX = ".tmp-"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename, fsync the directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def remove_orphan_temps(directory: Path) -> int:
    """Delete temp files left by a killed writer; returns how many were removed."""
    n = 0
    if Path(directory).is_dir():
        for p in Path(directory).glob(TMP_PREFIX + "*"):
            p.unlink(missing_ok=True)
            n += 1
    return n


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Serialize ``state`` with ``torch.save`` and write it atomically with its sha256 beside it."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    name = Path(path).name
    # Three atomic steps, so that a kill between any two leaves a file that loads:
    # 1. the checksum file lists the new digest and the old one, 2. the data is replaced,
    # 3. the checksum file lists only the new digest.
    old = _listed_digests(_sum_path(path))[:1] if Path(path).is_file() else []
    atomic_write_text(_sum_path(path), "".join(f"{d}  {name}\n" for d in [digest, *old]))
    atomic_write_bytes(path, data)
    if old:
        atomic_write_text(_sum_path(path), f"{digest}  {name}\n")


def _listed_digests(sum_file: Path) -> list[str]:
    try:
        return [line.split()[0] for line in sum_file.read_text(errors="replace").splitlines()
                if line.split()]
    except OSError:
        return []


def load_state(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a state file saved by :func:`save_state`; any damage → :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror}") from None
    sum_file = _sum_path(path)
    if not sum_file.is_file():
        raise CheckpointError(f"checkpoint is corrupt: {path} (its checksum file "
                              f"{sum_file.name} is missing)")
    if hashlib.sha256(data).hexdigest() not in _listed_digests(sum_file):
        raise CheckpointError(f"checkpoint is corrupt: {path} (sha256 does not match "
                              f"{sum_file.name})")
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"checkpoint is unsafe or corrupt: {path} (refused to unpickle: "
                              f"{str(exc).splitlines()[0][:160]})") from None
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, AttributeError,
            TypeError, IndexError) as exc:
        raise CheckpointError(f"checkpoint is corrupt: {path} ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint is corrupt: {path} (expected a dict of state)")
    return state


def _sum_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".sha256")
