"""benchmarks/speed.py: its pure helpers (exact values), the plain port against selfscale, and one
--quick run end to end. Only plumbing is checked: no speed is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from selfscale import direct
from selfscale.metrics import LOSSES
from selfscale.model import Init, build_model

SPEED_FILE = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


@pytest.fixture(scope="module")
def speed(load_benchmark):
    """The benchmark script as a module (it is a script, not part of the package)."""
    return load_benchmark("speed")


def test_step_flops_is_the_hand_count(speed):
    """5/5/1, 5×5: 1·5·25 + 5·5·25 + 5·1·25 = 875 MACs per pixel; 256²×3 pixels; ×2 FLOPs per
    MAC; ×3 for forward and the two backward products."""
    assert speed.step_flops(crop=256, batch=3) == 3 * 2 * 875 * 256 * 256 * 3 == 1_032_192_000
    assert speed.step_flops((2, 1), 3, crop=10, batch=1) == 6 * (1 * 2 * 9 + 2 * 1 * 9) * 100


def test_disabled_masks_alternate_layers_and_keep_one_mask_each(speed):
    assert speed.disabled_masks(0) == []
    assert speed.disabled_masks(2) == [(0, 4), (1, 4)]
    assert speed.disabled_masks(8) == [(0, 4), (1, 4), (0, 3), (1, 3), (0, 2), (1, 2), (0, 1),
                                       (1, 1)]
    assert speed.widths_without(speed.disabled_masks(8)) == (1, 1, 1)
    with pytest.raises(ValueError, match="k must be in 0..8"):
        speed.disabled_masks(9)


def test_mac_reduction_for_each_k(speed):
    """Active MACs: 4/4/1 100+400+100, 3/3/1 75+225+75, 2/2/1 50+100+50, 1/1/1 25+25+25."""
    for k, active in {0: 875, 2: 600, 4: 375, 6: 200, 8: 75}.items():
        assert speed.mac_reduction(speed.disabled_masks(k)) == 875 / active
    assert speed.widths_without(speed.COMPACT_OFF) == (3, 2, 1)
    assert speed.mac_reduction(speed.COMPACT_OFF) == 875 / (75 + 150 + 50)


class FakeWork:
    """Callables that advance a fake clock by scripted durations and log the call order."""

    def __init__(self, script: dict[str, list[tuple[float, int | None]]]) -> None:
        self.now, self.calls, self.syncs = 0.0, [], 0
        self.script = {name: iter(steps) for name, steps in script.items()}

    def clock(self) -> float:
        return self.now

    def sync(self) -> None:
        self.syncs += 1

    def fn(self, name: str):
        def call():
            seconds, units = next(self.script[name])
            self.now += seconds
            self.calls.append(name)
            return units
        return call


def test_best_rate_alternates_chunks_and_keeps_the_best(speed):
    work = FakeWork({"a": [(9.0, None), (2.0, None), (1.0, None), (4.0, None)],
                     "b": [(9.0, 5), (1.5, 3), (0.5, 3), (3.0, 3)]})
    rates = speed.best_rate({"a": work.fn("a"), "b": work.fn("b")}, repeats=3,
                            chunk_seconds=0.0, warmup=1, clock=work.clock, sync=work.sync)
    assert work.calls == ["a", "b"] + ["a", "b"] * 3  # warm-ups first, then alternating chunks
    assert rates["a"] == {"chunks": [0.5, 1.0, 0.25], "best": 1.0}
    assert rates["b"] == {"chunks": [2.0, 6.0, 1.0], "best": 6.0}
    assert work.syncs == 2 * 3 * 2  # when each chunk's clock starts and stops


def test_best_rate_fills_each_chunk_to_its_length(speed):
    work = FakeWork({"c": [(0.25, None)] * 8, "d": [(0.75, 2)] * 4})
    rates = speed.best_rate({"c": work.fn("c"), "d": work.fn("d")}, repeats=2,
                            chunk_seconds=1.0, warmup=0, clock=work.clock)
    assert work.calls == ["c"] * 4 + ["d"] * 2 + ["c"] * 4 + ["d"] * 2
    assert rates["c"] == {"chunks": [4.0, 4.0], "best": 4.0}
    assert rates["d"] == {"chunks": [4 / 1.5, 4 / 1.5], "best": 4 / 1.5}


def test_marginal_rate_and_payback(speed):
    assert speed.marginal_rate(100, 3.0, 600, 8.0) == 100.0
    assert speed.marginal_rate(10, 2.0, 40, 1.9) is None  # noise larger than the steps
    assert speed.payback_steps(10.0, 10.0, 20.0) == pytest.approx(200.0)
    assert speed.payback_steps(10.0, 20.0, 10.0) is None


def test_rows_judge_targets_and_the_table_shows_them(speed):
    rows = [speed.row("x", 0.75, (">=", 0.7)), speed.row("y", 0.2, ("<=", 0.1), "why"),
            speed.row("z", None, note="skipped: no onnx")]
    assert [r["met"] for r in rows] == [True, False, None]
    lines = speed.table(rows).splitlines()
    assert lines[0] == "| figure | ratio | target | met |"
    assert lines[2:] == ["| x | 0.75 | ≥ 0.7 | yes |", "| y (why) | 0.2 | ≤ 0.1 | no |",
                         "| z (skipped: no onnx) | – | – | – |"]


def test_plain_loss_equals_selfscale_f1_loss(speed):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.rand(3, 1, 17, 19, generator=g) * 1.5, torch.rand(3, 1, 17, 19,
                                                                           generator=g)
    expected = LOSSES["f1"](pred, target)
    assert abs(float(speed.plain_f1_loss(pred, target)) - float(expected)) < 1e-6


def test_plain_forward_equals_selfscale_fcn_with_copied_weights(speed):
    model = build_model((5, 5, 1), 5, 1, Init("he"), seed=3)
    net = speed.plain_net()
    with torch.no_grad():
        for conv, layer in zip((m for m in net if isinstance(m, torch.nn.Conv2d)), model.layers):
            conv.weight.copy_(layer.weight)
            conv.bias.copy_(layer.bias)
    x = torch.rand(2, 1, 33, 35, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, plain = model(x), net(x)
    assert bool((ours > 0).any())  # a live network: the comparison means something
    assert float((ours - plain).abs().max()) < 1e-5


def test_plain_port_step_returns_a_finite_loss(speed):
    rng = np.random.default_rng(0)
    images = [rng.random((40, 48), dtype=np.float32) for _ in range(2)]
    port = speed.PlainPort(images, [im * 0.5 for im in images], crop=16, batch=3, device="cpu")
    first = port.step()
    assert np.isfinite(first) and np.isfinite(port.step())


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SPEED_FILE), *args], capture_output=True,
                          text=True, timeout=300, check=False)


def test_quick_run_writes_every_number(tmp_path):
    out = tmp_path / "speed.json"
    done = _bench("--quick", "--only", "train,retrain,inference", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "| figure | ratio | target | met |"
    report = json.loads(out.read_text())
    assert set(report) == {"command", "machine", "settings", "sections", "rows"}
    assert {"cpu", "cores", "torch", "threads", "device", "platform"} <= set(report["machine"])
    assert report["machine"]["threads"] == 1 and report["settings"]["quick"] is True
    assert list(report["sections"]) == ["train", "retrain", "inference"]
    train = report["sections"]["train"]
    conv = report["machine"]["conv"]
    assert conv == direct.use("auto")  # what this machine resolves auto to
    assert set(train["steps_per_s"]) == {"selfscale 64", "plain 64", "selfscale 32", "plain 32",
                                         "sgemm 1024"} | ({"torch-conv 64", "torch-conv 32"}
                                                          if conv == "direct" else set())
    assert ("train 64²×3: --conv direct / --conv torch steps/s" in done.stdout) == \
        (conv == "direct")
    for rate in train["steps_per_s"].values():
        assert len(rate["chunks"]) == 2 and rate["best"] == max(rate["chunks"])
    assert set(train["end_to_end"]["seconds_best"]) == {"selfscale 10", "selfscale 40",
                                                        "plain 10", "plain 40"}
    assert train["compile"] == "skipped in --quick"
    retrain = report["sections"]["retrain"]
    assert set(retrain["k"]) == {"0", "2", "4", "6", "8"}
    assert retrain["k"]["8"]["widths"] == "1/1/1"
    assert retrain["k"]["8"]["mac_reduction"] == pytest.approx(875 / 75)
    if "speedup" in retrain["k"]["8"]:  # active-channel training present
        assert {"masked k=8", "active k=8"} <= set(retrain["steps_per_s"])
        rates = {k: v["best"] for k, v in retrain["steps_per_s"].items()}
        assert retrain["k"]["8"]["speedup"] == pytest.approx(rates["active k=8"]
                                                             / rates["masked k=0"])
    inference = report["sections"]["inference"]
    assert {"torch full", "torch compact"} <= set(inference["forwards_per_s"])
    assert inference["widths"] == [3, 2, 1]
    assert len(report["rows"]) == len(done.stdout.splitlines()) - 2


def test_retrain_batch_sets_the_crops_of_the_retrain_section(tmp_path):
    out = tmp_path / "speed.json"
    done = _bench("--quick", "--only", "retrain", "--retrain-batch", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr
    retrain = json.loads(out.read_text())["sections"]["retrain"]
    assert retrain["crops_per_step"] == 2
    assert "retrain k=8 (1/1/1), 2 crops/step: speed-up" in done.stdout


def test_retrain_steps_sets_the_length_of_a_timed_retrain(tmp_path, speed, capsys):
    out = tmp_path / "speed.json"
    done = _bench("--quick", "--only", "retrain", "--retrain-steps", "3", "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["sections"]["retrain"]["steps_per_retrain"] == 3
    assert report["settings"]["sizes"]["retrain_steps"] == 3
    assert speed.main(["--quick", "--retrain-steps", "0"]) == 2
    assert capsys.readouterr().err == "speed.py: error: --retrain-steps: must be at least 1, got 0\n"


def test_an_out_under_a_file_is_refused_before_the_run(speed, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me\n")
    assert speed.main(["--quick", "--only", "retrain", "--out", str(blocker / "speed.json")]) == 2
    err = capsys.readouterr().err
    assert err == f"speed.py: error: --out: {blocker} is a file, not a folder\n"
    assert len(err.splitlines()) == 1 and blocker.read_text() == "keep me\n"


def test_retrain_batch_below_one_is_a_one_line_usage_error(speed, capsys):
    assert speed.main(["--quick", "--retrain-batch", "0"]) == 2
    assert capsys.readouterr().err == "speed.py: error: --retrain-batch: must be at least 1, got 0\n"


def test_min_steps_parses_three_counts_and_refuses_the_rest(speed):
    assert speed.parse_min_steps("2000,7000,0") == (2000, 7000, 0)
    for bad in ("2000,7000", "a,b,c", "0,10,10", "10,0,10", "10,10,-1"):
        with pytest.raises(ValueError, match="--min-steps: "):
            speed.parse_min_steps(bad)


def test_refuses_to_overwrite_an_existing_out(tmp_path):
    out = tmp_path / "speed.json"
    out.write_text("keep me\n")
    done = _bench("--quick", "--out", str(out))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"speed.py: error: --out: {out} already exists; use --force to overwrite it"]
    assert out.read_text() == "keep me\n"


def test_unknown_section_is_a_one_line_usage_error(speed, capsys):
    assert speed.main(["--quick", "--only", "train,warp"]) == 2
    assert capsys.readouterr().err == ("speed.py: error: --only: unknown section(s) warp; "
                                       "choose from train,retrain,inference,minimize,study\n")
