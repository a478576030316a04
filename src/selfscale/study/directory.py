"""The study directory's ``study.json``: the spec, the scale, the versions, and one entry per
invocation; starting a study in ``--out`` or checking that ``--out`` holds this very study."""

from __future__ import annotations

import json
import platform
import socket
import time
from pathlib import Path
from typing import Any

from selfscale import __version__
from selfscale.checkpoint import atomic_write_text
from selfscale.errors import CheckpointError, ConfigError
from selfscale.study.engine import Outcome

STUDY_FILE = "study.json"


def versions() -> dict[str, Any]:
    """The versions a study records: selfscale, torch, dask, distributed, Python, machine."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Any] = {"selfscale": __version__}
    for package in ("torch", "dask", "distributed", "numpy", "matplotlib"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out | {"python": platform.python_version(), "platform": platform.platform(),
                  "machine": platform.machine(), "processor": platform.processor() or None,
                  "host": socket.gethostname()}


def read_study(directory: Path) -> dict[str, Any]:
    """``DIR/study.json``; a missing or damaged one → a one-line error."""
    path = Path(directory) / STUDY_FILE
    if not path.is_file():
        raise ConfigError(f"{directory} is not a study directory (no {STUDY_FILE})")
    try:
        study = json.loads(path.read_text())
    except (OSError, ValueError):
        study = None
    if not (isinstance(study, dict) and isinstance(study.get("spec"), dict)
            and isinstance(study["spec"].get("study"), str)):
        raise CheckpointError(f"study file is corrupt: {path}")
    return study


def open_study(directory: Path, spec: dict[str, Any], *, create: bool = True) -> dict[str, Any]:
    """Start the study of ``spec`` in ``directory`` (new or empty), or check that the study
    stored there has exactly this spec (then it resumes). Returns the study file's content;
    with ``create=False`` only checks (writes nothing; a new study's content is returned)."""
    from selfscale.study.specs import shown, spec_difference

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"--out: {directory} exists and is not a directory")
    if (directory / STUDY_FILE).is_file():
        study = read_study(directory)
        stored = study["spec"]
        if stored["study"] != spec["study"]:
            raise ConfigError(f"--out: {directory} holds a {stored['study']} study; choose "
                              "another --out")
        diff = spec_difference(stored, spec)
        if diff is not None:
            flag, old, new = diff
            raise ConfigError(f"--out: {directory} holds a {stored['study']} study with {flag} "
                              f"{shown(old)} (given {shown(new)}); give its settings to resume "
                              "it, or choose another --out")
        return study
    if directory.is_dir() and any(directory.iterdir()):
        raise ConfigError(f"--out: {directory} is not empty and holds no study ({STUDY_FILE}); "
                          "choose another --out")
    study = {"format": 1, "study": spec["study"], "scale": spec["scale"], "spec": spec,
             "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "invocations": []}
    if create:
        atomic_write_text(directory / STUDY_FILE, json.dumps(study, indent=2) + "\n")
    return study


def record_invocation(directory: Path, outcome: Outcome, cluster: str) -> None:
    """Append what this invocation did (and the versions it ran with) to ``DIR/study.json``."""
    study = read_study(directory)
    study.setdefault("invocations", []).append({
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cluster": cluster,
        "planned": outcome.planned, "done": outcome.done, "skipped": outcome.skipped,
        "failed": outcome.failed, "lost": outcome.lost, "seconds": outcome.seconds,
        "versions": versions()})
    atomic_write_text(Path(directory) / STUDY_FILE, json.dumps(study, indent=2) + "\n")
