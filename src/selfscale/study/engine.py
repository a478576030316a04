"""The study engine: trials (plain dicts) run on Dask, one JSON file per trial, resumable.

A study directory::

    DIR/
      study.json       the spec, the scale, the versions (selfscale, torch, dask, Python, the
                       machine) and one entry per invocation (:mod:`selfscale.study.directory`)
      trials/ID.json   one per trial: its parameters, status (done or failed), its result or its
                       error and traceback, the worker's host, versions and wall time
      bases/ID/        a trained network's run directory (usable with ``selfscale info``)
      networks/ID/     a minimized network (final.pt) and its summary
      results.csv      one row per trial: every parameter and every outcome
      report.html, report.md, figures/   written by ``selfscale report``

**Trials.** A trial is a plain, fully specified dict: ``id`` (also its file name), ``kind``, its
parameters with its own seed, and optionally ``needs``: the id of the trial whose output it takes
as input (a minimization needs its base network). Trials with equal ids must be equal dicts, so
two trials that need the same network (same config and seed) need the same trial.

**Result transfer.** Workers return each trial's output to the client through Dask: a JSON-able
``result`` and ``files`` as bytes. Only the client writes into DIR (files first, then the trial's
JSON, each atomically with :func:`selfscale.checkpoint.atomic_write_bytes`), so a trial's JSON is
there exactly when the trial is finished, and nothing assumes a disk shared with the workers.

**The base cache.** A needed trial is trained once per study. Its dependents are submitted the
moment it finishes (no wave barrier), with its output copied to every worker once: Dask runs a
task where its input data already is, so with the output on one worker only, all of a base's
dependents would queue on the worker that trained it while others idle. The client also stores
it (``bases/ID/``) the moment it finishes; a later invocation does not train it again but sends
the stored output to every worker once and passes that to the dependents still to run.

**Failures.** A trial that raises is recorded as failed with its error and traceback while the
others go on; trials that need it are recorded as failed naming it. A trial whose worker dies is
rescheduled by Dask on a live worker (up to ``distributed.scheduler.allowed-failures`` deaths,
3 by default; then it is recorded as failed). Failed trials run again when the study is resumed;
finished ones never do. A killed client loses only the trials in flight.
"""

from __future__ import annotations

import csv
import io
import json
import platform
import re
import socket
import sys
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfscale import __version__
from selfscale.checkpoint import atomic_write_bytes, atomic_write_text, remove_orphan_temps

TRIALS_DIR = "trials"
RESULTS_FILE = "results.csv"
STORE = {"train": "bases", "minimize": "networks"}
"""Where the files a trial returns are kept, by kind: ``DIR/<store>/<trial id>/``."""
POLL_SECONDS = 0.5
"""How often the client collects finished trials and reports progress."""
SKIPPED_COLUMNS = ("decision_log", "mask_matrix")
"""Outcomes too nested for one CSV cell; they stay in the trial's JSON."""
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,150}$")


@dataclass
class Progress:
    """What the progress bar shows, reported every :data:`POLL_SECONDS`."""

    total: int
    """Trials to run in this invocation (finished ones are not counted)."""
    done: int = 0
    failed: int = 0
    running: int = 0


@dataclass
class Outcome:
    """What an invocation did."""

    planned: int
    skipped: int
    """Finished by an earlier invocation, not run again."""
    done: int = 0
    failed: int = 0
    lost: int = 0
    """Cancelled before they finished (the scheduler went away); run again on resume."""
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)
    """(trial id, error) of this invocation's failed trials."""


# --- files --------------------------------------------------------------------------------------

def trial_file(directory: Path, trial_id: str) -> Path:
    return Path(directory) / TRIALS_DIR / f"{trial_id}.json"


def store_dir(directory: Path, trial: dict[str, Any]) -> Path:
    return Path(directory) / STORE.get(trial["kind"], "files") / trial["id"]


def read_record(path: Path) -> dict[str, Any] | None:
    """A trial's JSON, or None when it is missing or unreadable (the trial then runs again)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def load_records(directory: Path) -> dict[str, dict[str, Any]]:
    """Every trial JSON of a study directory, by trial id."""
    out = {}
    for path in sorted((Path(directory) / TRIALS_DIR).glob("*.json")):
        record = read_record(path)
        if record is not None and "id" in record:
            out[record["id"]] = record
    return out


def is_finished(record: dict[str, Any] | None, trial: dict[str, Any], directory: Path) -> bool:
    """Done, with the same parameters, and every file it returned still there."""
    return (record is not None and record.get("status") == "done" and record.get("trial") == trial
            and all((store_dir(directory, trial) / n).is_file() for n in record.get("files", [])))


def unfinished(plan: list[dict[str, Any]], directory: Path) -> list[dict[str, Any]]:
    """The trials of ``plan`` that still have to run (in plan order)."""
    return [t for t in plan
            if not is_finished(read_record(trial_file(directory, t["id"])), t, directory)]


def stored_output(directory: Path, trial: dict[str, Any], record: dict[str, Any]) -> dict:
    """A finished trial's output as its worker returned it: result and files."""
    where = store_dir(directory, trial)
    return {"result": record["result"],
            "files": {n: (where / n).read_bytes() for n in record.get("files", [])}}


def _json(value: Any) -> Any:
    """json.dumps' fallback: numpy scalars and paths."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _write_record(directory: Path, trial: dict[str, Any], record: dict[str, Any]) -> None:
    atomic_write_text(trial_file(directory, trial["id"]),
                      json.dumps(record, indent=1, default=_json) + "\n")


def _write_done(directory: Path, trial: dict[str, Any], out: dict[str, Any]) -> None:
    files = out.get("files") or {}
    remove_orphan_temps(store_dir(directory, trial))  # left by a client killed while writing
    for name, data in files.items():
        atomic_write_bytes(store_dir(directory, trial) / name, data)
    _write_record(directory, trial, {
        "id": trial["id"], "kind": trial["kind"], "status": "done", "trial": trial,
        "result": out["result"], "files": sorted(files), "host": out.get("host"),
        "versions": out.get("versions"), "seconds": out.get("seconds"),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


# --- the plan -----------------------------------------------------------------------------------

def check_plan(trials: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trials, duplicates merged and needed trials first; each made JSON-plain (so a stored
    copy compares equal). Conflicting duplicates, bad ids or unknown ``needs`` → ValueError."""
    plan: dict[str, dict[str, Any]] = {}
    for trial in trials:
        trial = json.loads(json.dumps(trial, default=_json))
        tid = trial.get("id")
        if not isinstance(tid, str) or not _ID.match(tid) or "kind" not in trial:
            raise ValueError(f"trial id {tid!r} is not a file name, or the trial has no kind")
        if tid in plan and plan[tid] != trial:
            raise ValueError(f"two different trials have the id {tid!r}")
        plan[tid] = trial
    for trial in plan.values():
        need = trial.get("needs")
        if need is not None and (need not in plan or plan[need].get("needs") is not None):
            raise ValueError(f"trial {trial['id']!r} needs {need!r}, which is not a planned "
                             "trial without needs of its own")
    return sorted(plan.values(), key=lambda t: t.get("needs") is not None)


# --- running ------------------------------------------------------------------------------------

def _on_worker(execute: Callable, trial: dict[str, Any], needed: Any) -> dict[str, Any]:
    """Runs on a worker: the trial, plus where and how long."""
    t0 = time.perf_counter()
    out = execute(trial, needed)
    torch = sys.modules.get("torch")
    out["host"] = socket.gethostname()
    out["versions"] = {"selfscale": __version__, "python": platform.python_version(),
                       **({"torch": torch.__version__} if torch else {})}
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def _error_text(trial: dict[str, Any], exc: BaseException | None, failed: set[str]) -> str:
    from distributed import KilledWorker

    if trial.get("needs") in failed:
        return f"the trial it needs ({trial['needs']}) failed"
    if isinstance(exc, KilledWorker):
        return ("its worker died every time it ran it (KilledWorker; see "
                "distributed.scheduler.allowed-failures)")
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _running(client, keys: set[str], threads: int) -> int:
    """Our trials that workers are executing (at most one per worker thread)."""
    try:
        busy = sum(1 for ks in client.processing().values() for k in ks if k in keys)
    except Exception:  # noqa: BLE001 - progress only; never stop the study for it
        return 0
    return min(busy, threads)


def _broadcast(client, output: dict[str, Any]):
    """A needed trial's output on every worker (one future), so each dependent can run on
    whichever worker is free."""
    return client.scatter([output], broadcast=True, hash=False)[0]


def _submit(client, trials: list[dict[str, Any]], needed: set[str], execute: Callable,
            inputs: dict[str, Any]) -> dict[str, Any]:
    """One Dask future per trial; a trial that needs another gets that one's broadcast output
    (``inputs``) as its argument."""
    return {trial["id"]: client.submit(
        _on_worker, execute, trial, inputs.get(trial.get("needs")),
        key=f"{trial['id']}-{uuid.uuid4().hex[:8]}", pure=False,
        priority=1 if trial["id"] in needed else 0) for trial in trials}


def _record(directory: Path, trial: dict[str, Any], future,
            failed: set[str]) -> tuple[str | None, dict[str, Any] | None]:
    """Write a finished future's trial file. Returns ("done", its output), or (the error of a
    failed trial, None), or (None, None) when the future was cancelled: the trial runs again
    next time."""
    if future.status == "finished":
        out = future.result()
        _write_done(directory, trial, out)
        return "done", out
    if future.status != "error":
        return None, None
    exc = future.exception()
    error = _error_text(trial, exc, failed)
    _write_failed(directory, trial, error, "".join(traceback.format_exception(exc))[-4000:])
    return error, None


def _write_failed(directory: Path, trial: dict[str, Any], error: str, trace: str) -> None:
    _write_record(directory, trial, {
        "id": trial["id"], "kind": trial["kind"], "status": "failed", "trial": trial,
        "error": error, "traceback": trace, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def _unrun(directory: Path, trial: dict[str, Any], need: str, failed: set[str]) -> str:
    """Record a trial whose needed trial failed, without running it; returns its error, which
    names that one."""
    error = _error_text(trial, None, failed | {need})
    _write_failed(directory, trial, error, "")
    return error


def run_trials(client, trials: Iterable[dict[str, Any]], directory: Path, *,
               execute: Callable | None = None,
               on_progress: Callable[[Progress], None] | None = None) -> Outcome:
    """Run every trial of ``trials`` not finished in ``directory`` on the Dask ``client``'s
    cluster and record each as it ends (see the module docstring). ``execute(trial, needed)`` runs
    one trial on a worker (default :func:`selfscale.study.trials.execute`) and returns
    ``{"result": {...}, "files": {name: bytes}}``; it must be importable on the workers."""
    from distributed import as_completed

    if execute is None:
        from selfscale.study.trials import execute
    t0 = time.perf_counter()
    directory = Path(directory)
    remove_orphan_temps(directory / TRIALS_DIR)
    plan = check_plan(trials)
    by_id = {t["id"]: t for t in plan}
    records = {t["id"]: read_record(trial_file(directory, t["id"])) for t in plan}
    todo = [t for t in plan if not is_finished(records[t["id"]], t, directory)]
    outcome = Outcome(planned=len(plan), skipped=len(plan) - len(todo))
    to_run = {t["id"] for t in todo}
    needed = {t["needs"] for t in todo if t.get("needs")}
    held: dict[str, list[dict[str, Any]]] = {}  # dependents of a base still to run, by base
    for t in todo:
        if t.get("needs") in to_run:
            held.setdefault(t["needs"], []).append(t)
    left = Counter(t["needs"] for t in todo if t.get("needs"))  # dependents yet to end, by base
    inputs = {need: _broadcast(client, stored_output(directory, by_id[need], records[need]))
              for need in needed - to_run}  # finished before: the stored output, sent once
    futures = _submit(client, [t for t in todo if t.get("needs") not in to_run], needed, execute,
                      inputs)
    pending = {f.key: tid for tid, f in futures.items()}
    progress, failed = Progress(total=len(todo)), set()
    threads = max(sum(client.nthreads().values()), 1)
    finished = as_completed(list(futures.values()))
    while not finished.is_empty():
        batch = finished.next_batch(block=False)
        batch.sort(key=lambda f: by_id[pending[f.key]].get("needs") is not None)  # bases first
        for future in batch:
            trial = by_id[pending.pop(future.key)]
            status, out = _record(directory, trial, future, failed)
            waiting = held.pop(trial["id"], [])
            if status == "done" and waiting:  # its dependents, on any worker
                inputs[trial["id"]] = _broadcast(client, out)
                for tid, dep in _submit(client, waiting, needed, execute, inputs).items():
                    pending[dep.key] = tid
                    finished.add(dep)
            elif waiting and status is None:  # it was lost: so are they (both run next time)
                outcome.lost += len(waiting)
            elif waiting:  # it failed: so do they, without running
                for dep in waiting:
                    progress.failed += 1
                    outcome.failures.append((dep["id"], _unrun(directory, dep, trial["id"],
                                                               failed)))
            if status == "done":
                progress.done += 1
            elif status is None:
                outcome.lost += 1
            else:
                progress.failed += 1
                failed.add(trial["id"])
                outcome.failures.append((trial["id"], status))
            futures.pop(trial["id"], None)  # let Dask forget its output
            need = trial.get("needs")
            if need is not None:
                left[need] -= 1
                if not left[need]:
                    inputs.pop(need, None)  # its last dependent ended: the copies go too
        progress.running = _running(client, set(pending), threads)
        if on_progress is not None:
            on_progress(progress)
        if not batch:
            time.sleep(POLL_SECONDS)
    outcome.done, outcome.failed = progress.done, progress.failed
    outcome.seconds = round(time.perf_counter() - t0, 2)
    return outcome


# --- the results table --------------------------------------------------------------------------

def _flatten(value: Any, prefix: str, row: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), row)
    elif isinstance(value, (list, tuple)):
        if all(not isinstance(v, (list, tuple, dict)) for v in value):  # widths: 5/5/1
            whole = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            row[prefix] = ("/" if whole else "; ").join(map(str, value))
    else:
        row[prefix] = value


def results_rows(plan: Iterable[dict[str, Any]], directory: Path) -> list[dict[str, Any]]:
    """One flat row per recorded trial of ``plan``: id, kind, status, error, host, wall time,
    then every parameter, then every outcome (``result.`` prefixes an outcome named like a
    parameter; one equal to it is left out)."""
    rows = []
    for trial in plan:
        record = read_record(trial_file(directory, trial["id"]))
        if record is None:
            continue
        row = {"id": trial["id"], "kind": trial["kind"], "status": record.get("status"),
               "error": record.get("error", ""), "host": record.get("host", ""),
               "wall_seconds": record.get("seconds", "")}
        _flatten({k: v for k, v in trial.items() if k not in ("id", "kind")}, "", row)
        outcome: dict[str, Any] = {}
        _flatten({k: v for k, v in (record.get("result") or {}).items()
                  if k not in SKIPPED_COLUMNS}, "", outcome)
        for k, v in outcome.items():
            if k not in row:
                row[k] = v
            elif row[k] != v:  # an outcome that repeats a parameter's name with another value
                row["result." + k] = v
        rows.append(row)
    return rows


def write_results_csv(plan: Iterable[dict[str, Any]], directory: Path) -> Path:
    """``DIR/results.csv`` (written atomically) from the trial files."""
    rows = results_rows(plan, directory)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path = Path(directory) / RESULTS_FILE
    atomic_write_text(path, buf.getvalue())
    return path
