"""The compact network: equivalence with the masked one, known slices, export round trips,
ONNX through onnxruntime, refusals and error messages."""

from __future__ import annotations

import io
import logging
import platform
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from selfscale.checkpoint import save_state
from selfscale.compact import (ExportMismatchError, architecture, compact_model, compare_speed,
                               export, load_compact, onnx_session, plain_torch_module,
                               verify_compact)
from selfscale.errors import CheckpointError, ConfigError, SelfscaleError
from selfscale.model import FCN, active_parameter_count, build_model

STD = 0.5  # larger than the thesis's 0.05 so that outputs are O(1) and differences show


def masked_net(widths, kernel=3, disabled=(), seed=0) -> FCN:
    model = build_model(widths, kernel, 1, STD, seed)
    for layer, mask in disabled:
        model.set_enabled(layer, mask, False)
    return model


def export_torch(model: FCN, path, meta=None):
    """The torch-format export of ``model`` checked on a small random batch."""
    return export(model, "torch", path, check_inputs=torch.rand(2, 1, 8, 8), meta=meta)


def thesis_net_six_off() -> FCN:
    """(5, 5, 1), k=5, with 6 of the 10 hidden masks disabled: active widths (2, 2, 1)."""
    off = [(0, 0), (0, 2), (0, 4), (1, 1), (1, 2), (1, 3)]
    return masked_net((5, 5, 1), 5, off, seed=3)


@st.composite
def masked_fcns(draw):
    n_layers = draw(st.integers(2, 3))
    widths = [draw(st.integers(1, 6)) for _ in range(n_layers - 1)] + [1]
    kernel = draw(st.sampled_from([1, 3, 5]))
    model = build_model(widths, kernel, 1, STD, draw(st.integers(0, 2**16)))
    for i, w in enumerate(widths[:-1]):
        on = draw(st.lists(st.booleans(), min_size=w, max_size=w).filter(any))
        for m, flag in enumerate(on):
            model.set_enabled(i, m, flag)
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    x = torch.rand(2, 1, h, w, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    return model, x


@settings(max_examples=60, deadline=None)
@given(masked_fcns())
def test_compact_equals_masked_for_random_patterns(case):
    """Any enabled pattern: same output (1e-5), widths = active widths, params = active count."""
    model, x = case
    compact = compact_model(model)
    assert compact.widths == model.active_widths()
    assert all(layer.enabled.all() and not layer.frozen.any() for layer in compact.layers)
    assert sum(p.numel() for p in compact.parameters()) == active_parameter_count(model)
    with torch.no_grad():
        assert torch.allclose(compact(x), model(x), rtol=0, atol=1e-5)


def test_known_slice_by_hand():
    """(3,2,1), layer 0 mask 1 off → layer 1 keeps input channels 0 and 2; the rest is copied."""
    model = masked_net((3, 2, 1), 3, [(0, 1)])
    compact = compact_model(model)
    assert compact.widths == (2, 2, 1)
    assert torch.equal(compact.layers[0].weight, model.layers[0].weight[[0, 2]])
    assert torch.equal(compact.layers[0].bias, model.layers[0].bias[[0, 2]])
    assert torch.equal(compact.layers[1].weight, model.layers[1].weight[:, [0, 2]])
    assert torch.equal(compact.layers[1].bias, model.layers[1].bias)
    assert torch.equal(compact.layers[2].weight, model.layers[2].weight)


def test_compact_keeps_dtype_and_leaves_model_and_rng_alone():
    """float64 stays float64; the masked model's switches and the global RNG are unchanged."""
    model = masked_net((4, 3, 1), 3, [(0, 3), (1, 0)]).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    compact = compact_model(model)
    assert torch.equal(torch.get_rng_state(), rng)
    assert compact.layers[0].weight.dtype == torch.float64
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.rand(1, 1, 9, 7, dtype=torch.float64)
    assert torch.allclose(compact(x), model(x), rtol=0, atol=1e-12)


def test_layer_without_enabled_mask_is_refused():
    """Zero enabled masks in a layer → ValueError naming the layer."""
    model = masked_net((2, 2, 1), 3, [(1, 0), (1, 1)])
    with pytest.raises(ValueError, match="layer 2 has no enabled mask"):
        compact_model(model)


def test_architecture_is_json_and_carries_provenance():
    """The description holds widths/kernel and the caller's keys, and refuses reserved keys."""
    compact = compact_model(thesis_net_six_off())
    arch = architecture(compact, {"task": "sobel", "task_params": {"norm": "max"}, "run": "r1"})
    assert arch["format"] == "selfscale-compact" and arch["version"] == 1
    assert arch["widths"] == [2, 2, 1] and arch["kernel"] == 5 and arch["in_channels"] == 1
    assert arch["task_params"] == {"norm": "max"}
    with pytest.raises(ValueError, match="reserved"):
        architecture(compact, {"widths": [1]})


def test_verify_compact_raises_when_compact_is_wrong():
    """A perturbed weight in the compact network → ExportMismatchError (a SelfscaleError)."""
    model = thesis_net_six_off()
    x = torch.rand(2, 1, 16, 16)
    compact = compact_model(model)
    assert verify_compact(model, compact, x) <= 1e-5
    with torch.no_grad():
        compact.layers[1].weight[0, 0, 2, 2] += 0.1
    with pytest.raises(ExportMismatchError, match="differs from the masked one") as info:
        verify_compact(model, compact, x)
    assert isinstance(info.value, SelfscaleError)


# --- torch format -------------------------------------------------------------------------------
def test_export_torch_round_trip_and_plain_recipe(tmp_path):
    """load_compact, plain torch.load(weights_only) and the nn.Sequential recipe all agree."""
    model = thesis_net_six_off()
    path = tmp_path / "net.pt"
    report = export(model, "torch", path, check_inputs=torch.rand(2, 1, 20, 20),
                    meta={"task": "sobel"})
    assert (tmp_path / "net.pt.sha256").is_file()
    assert report.widths_before == (5, 5, 1) and report.widths_after == (2, 2, 1)
    assert report.params_before == 886
    assert report.params_after == active_parameter_count(model) == 52 + 102 + 51
    assert report.macs_before == 25 * 35 and report.macs_after == 25 * (2 + 4 + 2)
    assert report.max_abs_diff <= 1e-5 and report.onnx_max_abs_diff is None

    x = torch.rand(3, 1, 17, 29)
    compact = compact_model(model)
    loaded = load_compact(path)
    blob = torch.load(path, weights_only=True)
    plain = plain_torch_module(blob["architecture"], blob["state_dict"])
    with torch.no_grad():
        assert torch.equal(loaded(x), compact(x))
        assert torch.allclose(plain(x), compact(x), rtol=0, atol=1e-6)
        assert torch.allclose(loaded(x), model(x), rtol=0, atol=1e-5)
    assert blob["architecture"]["task"] == "sobel"
    assert sorted(blob["state_dict"]) == [f"layers.{i}.{n}" for i in range(3)
                                          for n in ("bias", "weight")]


def test_export_refuses_to_overwrite(tmp_path):
    """An existing --out is kept unless overwrite=True."""
    path = tmp_path / "net.pt"
    path.write_bytes(b"keep me")
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(ConfigError, match="--out: .* already exists"):
        export(thesis_net_six_off(), "torch", path, check_inputs=x)
    assert path.read_bytes() == b"keep me"
    export(thesis_net_six_off(), "torch", path, check_inputs=x, overwrite=True)
    assert load_compact(path).widths == (2, 2, 1)


def test_unknown_format_names_the_flag(tmp_path):
    with pytest.raises(ConfigError, match="--format: unknown format 'tflite'"):
        export(thesis_net_six_off(), "tflite", tmp_path / "x", check_inputs=torch.rand(1, 1, 4, 4))


def test_failed_verification_writes_nothing(tmp_path, monkeypatch):
    """If the compact network does not match, export raises and leaves no file."""
    import selfscale.compact as compact_mod

    def broken(model):
        net = compact_model(model)
        with torch.no_grad():
            net.layers[0].bias += 1.0
        return net

    monkeypatch.setattr(compact_mod, "compact_model", broken)
    with pytest.raises(ExportMismatchError):
        export(thesis_net_six_off(), "torch", tmp_path / "net.pt",
               check_inputs=torch.rand(1, 1, 8, 8))
    assert list(tmp_path.iterdir()) == []


def test_tampered_file_is_a_checkpoint_error(tmp_path):
    """A flipped byte fails the sha256 check: one-line CheckpointError."""
    path = tmp_path / "net.pt"
    export_torch(thesis_net_six_off(), path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt") as info:
        load_compact(path)
    assert "\n" not in str(info.value)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("blob, message", [
    ({"architecture": {"format": "other"}, "state_dict": {}}, "format is 'other'"),
    ("evil", "unsafe"),
    ("version2", "version 2"),
    ("shape", "has shape"),
    ("nan", "NaN"),
])
def test_unusable_files_are_checkpoint_errors(tmp_path, blob, message):
    """Foreign, pickled-code, newer-version, wrongly shaped or NaN files are refused clearly."""
    path = tmp_path / "net.pt"
    export_torch(thesis_net_six_off(), path)
    good = torch.load(path, weights_only=True)
    if blob == "evil":
        blob = {"architecture": _Evil(), "state_dict": {}}
    elif blob == "version2":
        blob = {**good, "architecture": {**good["architecture"], "version": 2}}
    elif blob == "shape":
        blob = {**good, "state_dict": {**good["state_dict"],
                                       "layers.1.weight": torch.zeros(2, 3, 5, 5)}}
    elif blob == "nan":
        blob = {**good, "state_dict": {**good["state_dict"],
                                       "layers.0.bias": torch.tensor([0.0, float("nan")])}}
    save_state(path, blob)  # a valid checksum: the content itself must be rejected
    with pytest.raises(CheckpointError, match=message) as info:
        load_compact(path)
    assert "\n" not in str(info.value)


# --- ONNX ---------------------------------------------------------------------------------------
def test_onnx_matches_torch_on_other_sizes(tmp_path, capfd):
    """torch.onnx.export's file, run by onnxruntime on an N×H×W never seen at export, equals the
    compact network within 1e-5; the export prints nothing, leaves the RNG alone and replaces a
    torch file (and its stale checksum) only with overwrite=True."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = thesis_net_six_off()
    path = tmp_path / "net.onnx"
    export_torch(model, path)  # a torch file under the ONNX name, to be replaced
    x = torch.rand(1, 1, 16, 16)
    capfd.readouterr()
    rng = torch.get_rng_state()
    log, records = logging.getLogger("torch.onnx"), []  # e.g. "torchvision is not installed"
    handler = logging.Handler()
    handler.emit = records.append
    log.addHandler(handler)
    try:
        report = export(model, "onnx", path, check_inputs=x, meta={"task": "canny"},
                        overwrite=True)
    finally:
        log.removeHandler(handler)
    assert capfd.readouterr() == ("", "")
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []
    assert torch.equal(torch.get_rng_state(), rng)
    assert report.onnx_max_abs_diff is not None and report.onnx_max_abs_diff <= 1e-5
    assert report.max_abs_diff <= 1e-5 and report.widths_after == (2, 2, 1)
    assert not (tmp_path / "net.onnx.sha256").exists()

    proto = onnx.load(str(path))
    assert proto.opset_import[0].version >= 17
    assert not any(n.op_type == "Mul" for n in proto.graph.node)  # the plain Conv/Relu chain
    props = {p.key: p.value for p in proto.metadata_props}
    assert '"widths": [2, 2, 1]' in props["selfscale.architecture"]
    assert '"task": "canny"' in props["selfscale.architecture"]
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (proto.graph.input[0], proto.graph.output[0])]
    assert dims == [["batch", 1, "height", "width"]] * 2

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["edges"]
    compact = compact_model(model)
    for shape in [(2, 1, 23, 37), (3, 1, 1, 5)]:
        x = torch.rand(*shape)
        (out,) = session.run(["edges"], {"image": x.numpy()})
        with torch.no_grad():
            expected = compact(x)
        assert out.shape == shape
        assert torch.allclose(torch.from_numpy(out), expected, rtol=0, atol=1e-5)

    data = path.read_bytes()
    with pytest.raises(ConfigError, match="--out: .* already exists"):
        export(model, "onnx", path, check_inputs=torch.rand(1, 1, 8, 8))
    assert path.read_bytes() == data


def test_failed_onnx_check_writes_nothing(tmp_path, monkeypatch):
    """onnxruntime disagreeing with PyTorch → ExportMismatchError and no file."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import selfscale.compact as compact_mod

    real = compact_mod.plain_torch_module

    def broken(arch, state):
        net = real(arch, state)
        with torch.no_grad():
            net[0].bias += 1.0
        return net

    monkeypatch.setattr(compact_mod, "plain_torch_module", broken)
    with pytest.raises(ExportMismatchError, match="onnxruntime output differs"):
        export(thesis_net_six_off(), "onnx", tmp_path / "net.onnx",
               check_inputs=torch.rand(1, 1, 8, 8))
    assert list(tmp_path.iterdir()) == []


def test_onnx_session_runs_without_the_nchwc_layout(tmp_path):
    """onnx_session's graph keeps the plain NCHW convolutions (no node of onnxruntime's NCHWc
    domain, which pads each layer to 16 channels) and equals the compact network; onnxruntime's
    defaults on x86 do rewrite it to NCHWc (what the session is there to avoid)."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = thesis_net_six_off()
    path = tmp_path / "net.onnx"
    export(model, "onnx", path, check_inputs=torch.rand(1, 1, 8, 8))
    x = torch.rand(2, 1, 19, 23)
    with torch.no_grad():
        expected = compact_model(model)(x)
    nodes = {}
    for defaults in (False, True):
        graph = tmp_path / f"optimized-{defaults}.onnx"
        session = onnx_session(path, threads=1, defaults=defaults, optimized_path=graph)
        (out,) = session.run(["edges"], {"image": x.numpy()})
        assert torch.allclose(torch.from_numpy(out), expected, rtol=0, atol=1e-5)
        nodes[defaults] = [(n.domain, n.op_type) for n in onnx.load(str(graph)).graph.node]
    assert len([op for _, op in nodes[False] if op in ("Conv", "FusedConv")]) == 3  # one a layer
    assert all(domain != "com.microsoft.nchwc" for domain, _ in nodes[False])
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert ("com.microsoft.nchwc", "Conv") in nodes[True]


def test_missing_onnx_extra_is_a_clear_config_error(tmp_path, monkeypatch):
    """Without the 'onnx' (or 'onnxscript') package, --format onnx explains how to install the
    extra."""
    for missing in ("onnx", "onnxscript"):
        with monkeypatch.context() as m:
            m.setitem(sys.modules, missing, None)  # makes `import <missing>` raise ImportError
            with pytest.raises(ConfigError, match=r"pip install 'selfscale\[onnx\]'"):
                export(thesis_net_six_off(), "onnx", tmp_path / "net.onnx",
                       check_inputs=torch.rand(1, 1, 8, 8))
    assert not (tmp_path / "net.onnx").exists()


# --- speed --------------------------------------------------------------------------------------
def test_timing_helpers_return_positive_medians_and_leave_models_alone():
    """Smoke test only: timings are never asserted (machines are noisy)."""
    model = thesis_net_six_off()
    compact = compact_model(model)
    x = torch.rand(1, 1, 16, 16)
    speed = compare_speed(model, compact, x, repeats=2, warmup=1)
    assert speed["masked_s"] > 0 and speed["compact_s"] > 0
    assert speed["speedup"] == pytest.approx(speed["masked_s"] / speed["compact_s"])
    assert model.layers[0].weight.is_contiguous()  # not switched to channels_last in place


def test_pickle_module_is_not_needed_to_read_the_torch_export(tmp_path):
    """The torch file loads under weights_only from bytes (no selfscale classes pickled)."""
    path = tmp_path / "net.pt"
    export_torch(thesis_net_six_off(), path, {"run": "abc"})
    blob = torch.load(io.BytesIO(path.read_bytes()), weights_only=True)
    assert blob["architecture"]["run"] == "abc"
    assert b"selfscale.model" not in path.read_bytes()
