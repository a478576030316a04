"""benchmarks/onnx_layers.py: its counts by hand, the transposed form against a direct
convolution, and a tiny run whose three forms agree. No speed is asserted."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from selfscale.model import macs_per_pixel


@pytest.fixture(scope="module")
def layers(load_benchmark):
    return load_benchmark("onnx_layers")


def test_counts_per_pixel_by_hand(layers):
    full, small = layers.layers_of((5, 5, 1)), layers.layers_of((3, 2, 1))
    assert full == [(1, 5), (5, 5), (5, 1)] and small == [(1, 3), (3, 2), (2, 1)]
    assert macs_per_pixel((5, 5, 1), 5) == 25 * (5 + 25 + 5) == 875  # what the script uses
    assert macs_per_pixel((3, 2, 1), 5) == 25 * (3 + 6 + 2) == 275
    assert layers.unfolded_per_pixel(full) == 25 * (1 + 5 + 5) == 275
    assert layers.unfolded_per_pixel(small) == 25 * (1 + 3 + 2) == 150


@pytest.mark.parametrize("cin, cout, k", [(3, 2, 5), (1, 4, 3), (2, 1, 7)])
def test_transposed_weight_computes_the_same_convolution(layers, cin, cout, k):
    g = torch.Generator().manual_seed(cin * 10 + cout)
    x = torch.rand(2, cin, 11, 9, generator=g, dtype=torch.float64)
    w = torch.randn(cout, cin, k, k, generator=g, dtype=torch.float64)
    wt = torch.from_numpy(layers.transposed_weight(w.numpy()))
    assert wt.shape == (cin, cout, k, k)
    direct = F.conv2d(x, w, padding=k // 2)
    torch.testing.assert_close(F.conv_transpose2d(x, wt, padding=k // 2), direct,
                               rtol=1e-12, atol=1e-12)
    # a kernel that is not flipped computes the correlation's mirror: not the same layer
    unflipped = w.transpose(0, 1).contiguous()
    assert (F.conv_transpose2d(x, unflipped, padding=k // 2) - direct).abs().max() > 1e-3


def test_a_tiny_run_times_three_agreeing_forms(layers, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    out = tmp_path / "layers.json"
    assert layers.main(["--images", "1", "--side", "16", "--repeats", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["layer_seconds"]) == {"1->3", "1->5", "2->1", "3->2", "5->1", "5->5"}
    assert max(r["form_max_abs_diff"].values()) < 1e-5
    assert r["mac_reduction"] == pytest.approx(875 / 275)
    assert r["unfolded_reduction"] == pytest.approx(275 / 150)
    full = r["networks"]["full"]["seconds"]["conv"]
    assert full == pytest.approx(sum(r["layer_seconds"][x]["conv"] for x in ("1->5", "5->5", "5->1")))
    assert r["speedup"]["conv"] == pytest.approx(full / r["networks"]["compact"]["seconds"]["conv"])
    assert "| conv-transpose |" in capsys.readouterr().out
    # nothing the user made is overwritten
    assert layers.main(["--images", "1", "--side", "16", "--out", str(out)]) == 2
    assert "--out:" in capsys.readouterr().err


def test_bad_sizes_are_one_line_usage_errors(layers, capsys):
    assert layers.main(["--side", "0"]) == 2
    assert capsys.readouterr().err == "onnx_layers.py: error: --side: must be at least 1, got 0\n"


def test_an_out_under_a_file_is_refused_before_the_run(layers, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me\n")
    assert layers.main(["--images", "1", "--side", "16", "--out", str(blocker / "x.json")]) == 2
    err = capsys.readouterr().err
    assert err == f"onnx_layers.py: error: --out: {blocker} is a file, not a folder\n"
    assert len(err.splitlines()) == 1 and blocker.read_text() == "keep me\n"
