"""``selfscale study`` and ``selfscale report`` end to end at smoke scale (few steps) on real
2-worker Dask LocalClusters: the files written, resume (also after a kill), the report parsed,
and the one-line errors."""

from __future__ import annotations

import base64
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from html.parser import HTMLParser

import pytest

from selfscale.cli import main
from selfscale.study.cluster import dask_client

TINY = ["--scale", "smoke", "--seeds", "1", "--base-steps", "100", "--retrain-steps", "20",
        "--quiet"]
"""Smoke scale with fewer steps: each trial takes a second or two."""
STRATEGIES = ["study", "strategies", *TINY, "--strategies", "l1", "--thresholds", "0.9,1"]


@pytest.fixture(scope="module")
def address(tmp_path_factory):
    """A 2-worker LocalCluster this module's studies connect to with --address (its workers
    cache data under a temporary folder, not ~/.cache)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SELFSCALE_CACHE", str(tmp_path_factory.mktemp("worker-cache")))
        with dask_client(workers=2) as client:
            yield client.scheduler.address


@pytest.fixture(scope="module")
def strategies_dir(address, tmp_path_factory):
    """A finished strategies study: one seed, l1 at thresholds 0.9 and 1."""
    out = tmp_path_factory.mktemp("study") / "strategies"
    assert main([*STRATEGIES, "--address", address, "--out", str(out)]) == 0
    return out


def test_the_strategies_study_writes_its_files(strategies_dir):
    """study.json (spec, scale, versions), one JSON per trial, bases, networks, results.csv."""
    study = json.loads((strategies_dir / "study.json").read_text())
    assert study["scale"] == "smoke" and study["spec"]["strategies"] == ["l1"]
    assert {"selfscale", "torch", "dask", "distributed", "python", "machine"} <= set(
        study["versions"])
    assert sorted(p.name for p in (strategies_dir / "trials").iterdir()) == [
        "min-l1-t0.9-s0.json", "min-l1-t1-s0.json", "train-5x5x1-s0.json"]
    base = strategies_dir / "bases" / "train-5x5x1-s0"
    assert (base / "state.pt").is_file() and (base / "config.toml").is_file()
    assert (strategies_dir / "networks" / "min-l1-t1-s0" / "final.pt").is_file()
    record = json.loads((strategies_dir / "trials" / "min-l1-t0.9-s0.json").read_text())
    assert record["status"] == "done" and record["trial"]["minimize"]["threshold"] == 0.9
    assert record["trial"]["minimize"]["seed"] == 0 and record["result"]["decision_log"]
    with open(strategies_dir / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["done"] * 3
    assert {"config.train.steps", "strategy", "threshold", "ratio", "scores_after.f1",
            "steps_trained", "wall_seconds"} <= set(rows[0])


def test_the_same_command_again_runs_nothing(strategies_dir, address, capsys):
    before = {p: p.stat().st_mtime_ns for p in (strategies_dir / "trials").iterdir()}
    assert main([*STRATEGIES, "--address", address, "--out", str(strategies_dir),
                 "--no-report"]) == 0
    assert "0 done now, 3 skipped (finished before), 0 failed" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in (strategies_dir / "trials").iterdir()}


def test_a_killed_study_finishes_only_the_rest(address, tmp_path, capsys):
    """Kill the client after some trials; the same command runs only the trials not done.
    Six minimizations on two workers: the client writes finished trials every POLL_SECONDS
    (0.5 s), and at these lengths (0.3-2 s each) three were once written in one go."""
    out = tmp_path / "killed"
    args = [*TINY, "--strategies", "l1", "--thresholds", "0.8,0.85,0.9,0.95,0.98,1",
            "--address", address, "--out", str(out), "--no-report"]
    proc = subprocess.Popen([sys.executable, "-m", "selfscale", "study", "strategies", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(list((out / "trials").glob("*.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "trials").glob("*.json")}
    assert 2 <= len(kept) < 7, "the study was not interrupted half-way"
    assert main(["study", "strategies", *args]) == 0
    assert f"{7 - len(kept)} done now, {len(kept)} skipped" in capsys.readouterr().out
    assert kept == {p.name: p.stat().st_mtime_ns for p in (out / "trials").glob("*.json")
                    if p.name in kept}
    assert len(list((out / "trials").glob("*.json"))) == 7


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images, self.tables, self.headers, self._in_th = [], 0, [], False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        self.tables += tag == "table"
        self._in_th = tag == "th"

    def handle_data(self, data):
        if self._in_th:
            self.headers.append(data)
            self._in_th = False


def test_the_report_has_figures_tables_spec_and_commands(strategies_dir, tmp_path, capsys):
    """report.html embeds its figure as PNG data; report.md links PNG and SVG files."""
    out = tmp_path / "docs"
    assert main(["report", str(strategies_dir), "--out", str(out)]) == 0
    assert "report:" in capsys.readouterr().out
    text = (out / "report.html").read_text()
    page = _Page()
    page.feed(text)
    assert len(page.images) == 1 and page.images[0].startswith("data:image/png;base64,")
    assert base64.b64decode(page.images[0].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.tables >= 3
    assert {"strategy", "threshold", "final/base score", "active masks", "MACs per pixel",
            "training steps", "wall time (s)"} <= set(page.headers)
    assert "selfscale study strategies --scale smoke" in text and "&quot;seeds&quot;: 1" in text
    md = (out / "report.md").read_text()
    assert "![" in md and "| l1 | 0.90 | 1/1 |" in md and "```json" in md
    assert (out / "figures" / "strategies.png").is_file()
    assert (out / "figures" / "strategies.svg").read_text().lstrip().startswith("<?xml")
    assert (out / "results.csv").is_file()


def test_the_gridsearch_study(address, tmp_path, capsys):
    """Every (w1, w2, 1) up to width 2, the minimizer alongside on the (2, 2, 1) networks (they
    are its base networks: trained once), and the headline."""
    out = tmp_path / "grid"
    assert main(["study", "gridsearch", *TINY, "--max-width", "2", "--thresholds", "0.5,0.9",
                 "--address", address, "--out", str(out)]) == 0
    assert "6 trials: 6 done now, 0 skipped" in capsys.readouterr().out
    names = sorted(p.stem for p in (out / "trials").iterdir())
    assert names == ["min-l1-t0.5-s0", "min-l1-t0.9-s0", "train-1x1x1-s0", "train-1x2x1-s0",
                     "train-2x1x1-s0", "train-2x2x1-s0"]
    md = (out / "report.md").read_text()
    assert "grid search trains 4 configurations × 1 seed = 400 steps to find (" in md
    assert "the minimizer (l1) finds (" in md and "| 0.90 | (" in md
    assert (out / "figures" / "gridsearch.png").is_file()
    assert main(["report", str(out)]) == 0
    assert "grid search trains 4 configurations" in capsys.readouterr().out


def test_gridsearch_takes_the_minimizer_from_a_strategies_study(strategies_dir, tmp_path):
    """--minimizer: no minimization is planned; the answer and its cost come from that study
    (whose base network is also this grid's (5, 5, 1) network of seed 0)."""
    from selfscale.study import gridsearch
    from selfscale.study.engine import load_records
    from selfscale.study.specs import resolve_spec
    from selfscale.study.tables import widths_text

    spec = resolve_spec(gridsearch.Spec, "gridsearch", gridsearch.SCALES, "smoke", {
        "seeds": 1, "base_steps": 100, "retrain_steps": 20, "thresholds": "0.9,1",
        "minimizer": str(strategies_dir)})
    gridsearch.check(spec)
    plan = gridsearch.plan(spec)
    assert {t["kind"] for t in plan} == {"train"} and len(plan) == 25
    analysis = gridsearch.analyse(spec, plan, load_records(strategies_dir), tmp_path)
    steps = load_records(strategies_dir)["min-l1-t1-s0"]["result"]["steps_trained"] + 100
    found = widths_text(analysis.data["minimizer"][-1][1])
    expected = ("At threshold 1.00 on sobel: grid search trains 25 configurations × 1 seed = "
                f"2,500 steps to find (5, 5, 1); the minimizer (l1) finds {found} in {steps:,} "
                "steps (1 seed, base training included).")
    assert analysis.headline == [expected]


def test_gridsearch_refuses_a_minimizer_study_trained_otherwise(strategies_dir, tmp_path,
                                                               capsys):
    args = ["study", "gridsearch", *TINY, "--out", str(tmp_path / "g"), "--minimizer"]
    assert main([*args, str(strategies_dir), "--base-steps", "200"]) == 2
    assert ("trained its base networks with --base-steps 100 (this study: 200)"
            in capsys.readouterr().err)
    assert main([*args, str(tmp_path)]) == 2
    assert "--minimizer: " in capsys.readouterr().err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args, message", [
    (["study", "nope", "--out", "x"], "argument STUDY: invalid choice: 'nope'"),
    (["study", "strategies", "--scale", "huge", "--out", "x"], "invalid choice: 'huge'"),
    (["study", "strategies", "--seeds", "0", "--out", "x"], "--seeds: must be an integer"),
    (["study", "strategies", "--thresholds", "0.9,1.5", "--out", "x"],
     "--thresholds: every threshold must be in (0, 1]"),
    (["study", "strategies", "--strategies", "l1,nope", "--out", "x"],
     "--strategies: unknown strategy"),
    (["study", "gridsearch", "--depths", "3,7", "--out", "x"], "--depths: each must be 2, 3"),
    (["study", "strategies", "--workers", "0", "--out", "x"], "--workers: must be an integer"),
    (["study", "strategies", "--address", "localhost", "--out", "x"],
     "--address: expected tcp://HOST:PORT"),
    (["report", "."], "is not a study directory"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_an_out_holding_another_study_is_refused(strategies_dir, capsys):
    assert main(["study", "gridsearch", *TINY, "--out", str(strategies_dir)]) == 2
    assert "holds a strategies study; choose another --out" in capsys.readouterr().err
    assert main([*STRATEGIES, "--seeds", "2", "--out", str(strategies_dir)]) == 2
    assert "with --seeds 1 (given 2)" in capsys.readouterr().err


def test_an_unreachable_address_fails_fast_naming_it(tmp_path, capsys):
    address = f"tcp://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    assert main([*STRATEGIES, "--address", address, "--out", str(tmp_path / "s")]) == 2
    assert time.monotonic() - t0 < 10
    err = capsys.readouterr().err
    assert f"--address: cannot reach a Dask scheduler at {address}" in err
    assert err.count("\n") == 1 and not (tmp_path / "s").exists()


def test_the_progress_bar_redraws_only_on_news_off_a_terminal(monkeypatch):
    """A study polls its trials ten times a second; a log file must not get a line per poll."""
    import io
    import time
    import types

    from selfscale.study import command

    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    bar = command._Bar(False, "study")
    for _ in range(8):  # past tqdm's 0.1 s minimum interval each time
        bar(types.SimpleNamespace(total=3, done=0, failed=0, running=2))
        time.sleep(0.12)
    bar(types.SimpleNamespace(total=3, done=1, failed=0, running=2))
    bar.close()
    drawn = err.getvalue().count("\r")
    assert 1 <= drawn <= 5 and "1/3" in err.getvalue()  # 8 polls, one with news
