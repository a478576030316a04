"""The study engine on a real 2-worker Dask LocalCluster, with stand-in trials (no torch): every
trial recorded, failures recorded while the others finish, resume, worker death, base transfer."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import cloudpickle
import pytest

from selfscale.study.cluster import dask_client
from selfscale.study.engine import (STORE, check_plan, load_records, results_rows, run_trials,
                                    trial_file, write_results_csv)

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import tests/


def fake_execute(trial: dict, needed: dict | None) -> dict:
    """A stand-in trial: logs that it ran, fails or kills its worker when told to, returns a
    value and (for 'train') a file; a dependent reports what it received from its base."""
    if trial.get("die_once") and not Path(trial["die_once"]).exists():
        Path(trial["die_once"]).touch()
        os._exit(1)  # the worker process dies mid-trial
    with open(trial["log"], "a") as fh:
        fh.write(trial["id"] + "\n")
    if trial.get("fail"):
        raise ValueError(f"planned failure of {trial['id']}")
    result = {"value": trial["x"] * 2}
    files = {"blob.bin": bytes([trial["x"]]) * 3} if trial["kind"] == "train" else {}
    if needed is not None:
        result["from_base"] = needed["result"]["value"]
        result["base_file"] = needed["files"]["blob.bin"].hex()
    return {"result": result, "files": files}


@pytest.fixture(scope="module")
def client():
    with dask_client(workers=2) as c:
        yield c


def _plan(log: Path, *, fail: str | None = None) -> list[dict]:
    base = [{"id": f"b{i}", "kind": "train", "x": i, "log": str(log)} for i in (1, 2)]
    deps = [{"id": f"d{i}{j}", "kind": "minimize", "needs": f"b{i}", "x": 10 * i + j,
             "log": str(log)} for i in (1, 2) for j in (1, 2)]
    trials = deps + base  # the engine puts needed trials first
    for t in trials:
        if t["id"] == fail:
            t["fail"] = True
    return trials


def _ran(log: Path) -> list[str]:
    return sorted(log.read_text().split()) if log.exists() else []


def test_every_trial_is_recorded_and_bases_reach_their_dependents(client, tmp_path):
    """Each trial gets its JSON; a base's files are stored and passed to its dependents."""
    log, seen = tmp_path / "log", []
    out = run_trials(client, _plan(log), tmp_path / "study", execute=fake_execute,
                     on_progress=lambda p: seen.append((p.total, p.done, p.failed, p.running)))
    assert (out.planned, out.done, out.skipped, out.failed) == (6, 6, 0, 0)
    assert _ran(log) == ["b1", "b2", "d11", "d12", "d21", "d22"]
    records = load_records(tmp_path / "study")
    assert records["d21"]["result"] == {"value": 42, "from_base": 4, "base_file": "020202"}
    assert (tmp_path / "study" / STORE["train"] / "b2" / "blob.bin").read_bytes() == b"\2\2\2"
    assert records["b1"]["files"] == ["blob.bin"] and records["b1"]["host"]
    assert seen[-1][:3] == (6, 6, 0) and all(0 <= r <= 2 for *_, r in seen)


def test_a_failing_trial_is_recorded_while_the_others_finish(client, tmp_path):
    """The error and traceback are kept; trials that need the failed one fail naming it."""
    log, study = tmp_path / "log", tmp_path / "study"
    out = run_trials(client, _plan(log, fail="b2"), study, execute=fake_execute)
    assert (out.done, out.failed) == (3, 3)
    records = load_records(study)
    assert records["b2"]["status"] == "failed"
    assert records["b2"]["error"] == "ValueError: planned failure of b2"
    assert "fake_execute" in records["b2"]["traceback"]
    assert records["d21"]["error"] == "the trial it needs (b2) failed"
    assert {records[i]["status"] for i in ("b1", "d11", "d12")} == {"done"}
    assert sorted(i for i, _ in out.failures) == ["b2", "d21", "d22"]
    rows = {r["id"]: r for r in results_rows(check_plan(_plan(log, fail="b2")), study)}
    assert rows["b2"]["status"] == "failed" and rows["d11"]["from_base"] == 2


def test_resume_runs_only_unfinished_trials(client, tmp_path):
    """Again: nothing runs. A trial lost in a kill (its JSON missing) runs alone, and gets its
    base from the study directory (the base is not trained again)."""
    log, study = tmp_path / "log", tmp_path / "study"
    run_trials(client, _plan(log), study, execute=fake_execute)
    first = {p.name: p.stat().st_mtime_ns for p in (study / "trials").iterdir()}
    again = run_trials(client, _plan(log), study, execute=fake_execute)
    assert (again.done, again.skipped) == (0, 6) and len(_ran(log)) == 6
    trial_file(study, "d12").unlink()
    third = run_trials(client, _plan(log), study, execute=fake_execute)
    assert (third.done, third.skipped) == (1, 5)
    assert load_records(study)["d12"]["result"]["base_file"] == "010101"  # from bases/b1/
    (study / "trials" / "b2.json").write_text("{torn")  # a damaged record: that trial again
    fourth = run_trials(client, _plan(log), study, execute=fake_execute)
    assert (fourth.done, fourth.skipped) == (1, 5)
    assert _ran(log) == ["b1", "b2", "b2", "d11", "d12", "d12", "d21", "d22"]
    unchanged = {p.name: p.stat().st_mtime_ns for p in (study / "trials").iterdir()
                 if p.name not in ("d12.json", "b2.json")}
    assert unchanged == {k: v for k, v in first.items() if k in unchanged}


def test_a_trial_whose_worker_dies_is_retried(client, tmp_path):
    """Dask reschedules the trial of a dead worker (the nanny restarts the worker)."""
    log, study = tmp_path / "log", tmp_path / "study"
    trials = [{"id": "dies", "kind": "train", "x": 3, "log": str(log),
               "die_once": str(tmp_path / "died")},
              {"id": "lives", "kind": "train", "x": 4, "log": str(log)}]
    out = run_trials(client, trials, study, execute=fake_execute)
    assert (tmp_path / "died").exists() and (out.done, out.failed) == (2, 0)
    assert load_records(study)["dies"]["result"]["value"] == 6


def test_results_csv_has_one_row_per_trial_with_parameters_and_outcomes(client, tmp_path):
    log, study = tmp_path / "log", tmp_path / "study"
    plan = check_plan(_plan(log))
    run_trials(client, plan, study, execute=fake_execute)
    lines = write_results_csv(plan, study).read_text().splitlines()
    header = lines[0].split(",")
    assert len(lines) == 7 and header[:6] == ["id", "kind", "status", "error", "host",
                                              "wall_seconds"]
    assert {"x", "needs", "value", "from_base", "base_file"} <= set(header)


@pytest.mark.parametrize("trials, message", [
    ([{"id": "a", "kind": "train", "x": 1}, {"id": "a", "kind": "train", "x": 2}],
     "two different trials have the id 'a'"),
    ([{"id": "a", "kind": "minimize", "needs": "zz"}], "needs 'zz'"),
    ([{"id": "../a", "kind": "train"}], "is not a file name"),
])
def test_a_bad_plan_is_refused(trials, message):
    with pytest.raises(ValueError, match=message):
        check_plan(trials)


def test_a_plan_merges_equal_duplicates_and_puts_needed_trials_first():
    plan = check_plan([{"id": "d", "kind": "minimize", "needs": "b"},
                       {"id": "b", "kind": "train", "w": (5, 5, 1)},
                       {"id": "b", "kind": "train", "w": [5, 5, 1]}])
    assert [t["id"] for t in plan] == ["b", "d"] and plan[0]["w"] == [5, 5, 1]
    assert json.loads(json.dumps(plan)) == plan


def where_execute(trial: dict, needed: dict | None) -> dict:
    """A stand-in trial that reports the worker it ran on (dependents wait a little, so that
    both would be waiting at once on the base's worker if they were sent there)."""
    import time

    from distributed import get_worker

    if needed is not None:
        time.sleep(0.5)
    return {"result": {"worker": get_worker().address}, "files": {"f": b"x"}}


class _Recorder:
    """The client, recording when each trial is submitted and how needed outputs are sent."""

    def __init__(self, client, study: Path):
        self.client, self.study, self.calls = client, study, []

    def __getattr__(self, name):
        return getattr(self.client, name)

    def submit(self, fn, execute, trial, arg, **kw):
        self.calls.append(("submit", trial["id"], (self.study / "trials" / "b.json").exists()))
        return self.client.submit(fn, execute, trial, arg, **kw)

    def scatter(self, data, **kw):
        self.calls.append(("scatter", kw.get("broadcast"), None))
        return self.client.scatter(data, **kw)


def test_dependents_start_after_their_base_with_its_output_on_every_worker(client, tmp_path):
    """Dask runs a task where its input already is: a base's output held by one worker would
    queue all its dependents there. They are submitted once the base is done (its record
    written), with its output sent to every worker, and so run on both."""
    study = tmp_path / "study"
    plan = [{"id": "b", "kind": "train"}, *({"id": f"d{j}", "kind": "minimize", "needs": "b"}
                                           for j in (1, 2))]
    rec = _Recorder(client, study)
    out = run_trials(rec, plan, study, execute=where_execute)
    assert out.done == 3
    assert rec.calls == [("submit", "b", False), ("scatter", True, None),
                         ("submit", "d1", True), ("submit", "d2", True)]
    records = load_records(study)
    assert {records[d]["result"]["worker"] for d in ("d1", "d2")} == set(client.nthreads())
    (study / "trials" / "d2.json").unlink()  # resumed: the stored base goes to every worker too
    rec.calls.clear()
    assert run_trials(rec, plan, study, execute=where_execute).done == 1
    assert rec.calls == [("scatter", True, None), ("submit", "d2", True)]
