"""The physically smaller network (disabled masks removed) and its export to PyTorch and ONNX.

A disabled mask outputs exactly 0 after its ReLU (model.py), so dropping it together with the
input channel it feeds in the next layer leaves the output unchanged up to float summation order:
:func:`compact_model` builds that network, :func:`export` checks it against the masked one and
writes it. Both file formats describe the network in a small JSON-able dict (:func:`architecture`).

A ``--format torch`` file needs neither selfscale nor pickled code; plain PyTorch rebuilds it::

    import torch
    from torch import nn

    blob = torch.load("edges.pt", weights_only=True)
    arch, sd = blob["architecture"], blob["state_dict"]
    layers, c, k = [], arch["in_channels"], arch["kernel"]
    for i, w in enumerate(arch["widths"]):
        conv = nn.Conv2d(c, w, k, padding=k // 2)
        conv.load_state_dict({"weight": sd[f"layers.{i}.weight"], "bias": sd[f"layers.{i}.bias"]})
        layers += [conv, nn.ReLU()]
        c = w
    net = nn.Sequential(*layers).eval()
    # image: float32 (N, 1, H, W) in [0, 1]
    edges = (net(image).clamp(0, 1) * 255).round().to(torch.uint8)

(:func:`plain_torch_module` is that recipe.) A ``--format onnx`` file is that network exported by
``torch.onnx.export(dynamo=True)`` (opset 18): input ``image``, output ``edges``, dynamic batch,
height and width; the same dict is stored as JSON in its metadata under ``selfscale.architecture``.
Run it with :func:`onnx_session` (or onnxruntime with ``disabled_optimizers=["NchwcTransformer"]``):
onnxruntime's default NCHWc layout pads every convolution to 16 output channels (AVX-512), so a
compact network gains less than its MACs say (benchmarks/speed.py's inference section measures
both: the thesis's 5/5/1 compacted to 3/2/1 ran 1.2–1.4× faster without that pass).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from selfscale.checkpoint import atomic_write_bytes, load_state, save_state
from selfscale.errors import CheckpointError, ConfigError, SelfscaleError
from selfscale.model import FCN, macs_per_pixel, parameter_count

FORMAT_NAME = "selfscale-compact"
FORMAT_VERSION = 1
FORMATS = ("torch", "onnx")
ONNX_OPSET = 18  # the lowest opset torch's exporter writes without a version conversion
ONNX_INPUT, ONNX_OUTPUT = "image", "edges"
ONNX_META_KEY = "selfscale.architecture"
ATOL = 1e-5
"""Largest |masked − compact| accepted on the check inputs (float32 summation order only)."""
ORT_DISABLED_OPTIMIZERS = ("NchwcTransformer",)
"""onnxruntime graph optimizers :func:`onnx_session` turns off. The NCHWc layout pass pads each
convolution's outputs to a block of 16 channels (8 with AVX2): a 3-mask layer then costs as much
as a 16-mask one (measured in benchmarks/speed.py's inference section)."""
ONNX_EXTRA_MISSING = "--format onnx needs the 'onnx' extra: pip install 'selfscale[onnx]'"

_FIXED_KEYS = ("format", "version", "in_channels", "kernel", "widths", "padding", "activation",
               "input", "output")


class ExportMismatchError(SelfscaleError):
    """The compact network (or the exported file) does not reproduce the masked network."""


# --- the compact network ----------------------------------------------------------------------
def compact_model(model: FCN) -> FCN:
    """A new FCN, every switch on, holding only the enabled masks of ``model``.

    Layer i keeps weight[enabled_i][:, enabled_{i-1}] and bias[enabled_i] (enabled_{-1}: all input
    channels). Same dtype and device as ``model``; ``model`` is not changed. A layer without an
    enabled mask → ValueError (the network would output zeros; the minimizer never does this).
    """
    widths = model.active_widths()
    empty = [i + 1 for i, w in enumerate(widths) if w == 0]
    if empty:
        raise ValueError(f"layer {empty[0]} has no enabled mask; a compact network needs at "
                         f"least one per layer (active widths {widths})")
    ref = model.layers[0].weight
    with torch.random.fork_rng(devices=[]):  # FCN() draws a default init: keep the RNG untouched
        compact = FCN(widths, model.kernel, model.in_channels)
    compact.to(device=ref.device, dtype=ref.dtype)
    keep_in = torch.arange(model.in_channels, device=ref.device)
    with torch.no_grad():
        for old, new in zip(model.layers, compact.layers):
            keep_out = old.enabled.nonzero().flatten()
            new.weight.copy_(old.weight[keep_out][:, keep_in])
            new.bias.copy_(old.bias[keep_out])
            keep_in = keep_out
    return compact


def architecture(model: FCN, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON-able description stored with an export; ``meta`` adds provenance keys (task,
    its parameters, source run). Describes ``model`` as it is: pass the compact network."""
    arch: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "in_channels": int(model.in_channels),
        "kernel": int(model.kernel),
        "widths": [int(w) for w in model.widths],
        "padding": "same (k//2 zeros)",
        "activation": "relu after every layer",
        "input": "grayscale float32 in [0,1], shape (N,1,H,W)",
        "output": "(N,1,H,W), clip to [0,1] and x255 for an 8-bit image",
    }
    meta = dict(meta or {})
    clash = sorted(set(meta) & set(_FIXED_KEYS))
    if clash:
        raise ValueError(f"meta may not set the reserved architecture key(s) {clash}")
    arch.update(meta)
    try:  # a JSON round trip keeps only what both ONNX metadata and weights_only loading accept
        return json.loads(json.dumps(arch, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"meta must be JSON-serializable: {exc}") from None


def plain_torch_module(arch: dict[str, Any], state_dict: dict[str, Tensor]) -> nn.Sequential:
    """The exported network as plain ``nn.Conv2d``/``nn.ReLU`` layers (the recipe above)."""
    _check_compact(arch, state_dict, "state")
    layers: list[nn.Module] = []
    c, k = arch["in_channels"], arch["kernel"]
    with torch.random.fork_rng(devices=[]):
        for i, w in enumerate(arch["widths"]):
            conv = nn.Conv2d(c, w, k, padding=k // 2)
            conv.load_state_dict({"weight": state_dict[f"layers.{i}.weight"],
                                  "bias": state_dict[f"layers.{i}.bias"]})
            layers += [conv, nn.ReLU()]
            c = w
    return nn.Sequential(*layers).eval()


# --- checking ---------------------------------------------------------------------------------
def max_abs_diff(a: nn.Module | Callable[[Tensor], Tensor], b: nn.Module, inputs: Tensor) -> float:
    """max |a(inputs) − b(inputs)|, each run on its own device and dtype, compared in float64."""
    with torch.no_grad():
        outs = [m(inputs.to(**_placement(m))).detach().to("cpu", torch.float64) for m in (a, b)]
    if outs[0].shape != outs[1].shape:
        return float("inf")
    return float((outs[0] - outs[1]).abs().max()) if outs[0].numel() else 0.0


def verify_compact(masked: FCN, compact: nn.Module, inputs: Tensor, atol: float = ATOL) -> float:
    """max |masked(x) − compact(x)| on ``inputs``; above ``atol`` → :class:`ExportMismatchError`."""
    diff = max_abs_diff(masked, compact, inputs)
    if not diff <= atol:
        raise ExportMismatchError(f"the compact network differs from the masked one by {diff:.3g} "
                                  f"(> {atol:g}) on the check inputs; nothing was written")
    return diff


# --- torch format -----------------------------------------------------------------------------
def _state_dict(compact: FCN) -> dict[str, Tensor]:
    """``layers.{i}.weight`` / ``layers.{i}.bias`` of the compact network: what both files hold."""
    return {f"layers.{i}.{name}": getattr(layer, name).detach().clone()
            for i, layer in enumerate(compact.layers) for name in ("weight", "bias")}


def load_compact(path: Path) -> FCN:
    """Rebuild the FCN from a torch-format export; damaged, unsafe or foreign → CheckpointError."""
    blob = load_state(Path(path))
    arch, state = blob.get("architecture"), blob.get("state_dict")
    _check_compact(arch, state, str(path))
    with torch.random.fork_rng(devices=[]):
        model = FCN(arch["widths"], arch["kernel"], arch["in_channels"])
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            layer.weight.copy_(state[f"layers.{i}.weight"])
            layer.bias.copy_(state[f"layers.{i}.bias"])
    return model.eval()


def _check_compact(arch: Any, state: Any, source: str) -> None:
    """Raise CheckpointError (one line) unless ``arch``/``state`` describe a valid compact FCN."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"not a usable compact network: {source} ({why})")

    def pos_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if not isinstance(arch, dict) or not isinstance(state, dict):
        raise bad("expected 'architecture' and 'state_dict' dicts")
    if arch.get("format") != FORMAT_NAME:
        raise bad(f"format is {arch.get('format')!r}, expected {FORMAT_NAME!r}")
    version = arch.get("version")
    if version != FORMAT_VERSION:
        raise bad(f"version {version!r}; this selfscale reads version {FORMAT_VERSION}")
    c, k, widths = arch.get("in_channels"), arch.get("kernel"), arch.get("widths")
    if not (pos_int(c) and pos_int(k)):
        raise bad(f"in_channels {c!r} and kernel {k!r} must be positive integers")
    if not (isinstance(widths, list) and widths and all(pos_int(w) for w in widths)
            and widths[-1] == 1):
        raise bad(f"widths {widths!r} must be positive integers ending with 1")
    expected: dict[str, tuple[int, ...]] = {}
    for i, w in enumerate(widths):
        expected[f"layers.{i}.weight"] = (w, c, k, k)
        expected[f"layers.{i}.bias"] = (w,)
        c = w
    if set(state) != set(expected):
        extra, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
        raise bad(f"state_dict keys do not match the widths (missing {missing[:3]}, "
                  f"unexpected {extra[:3]})")
    for key, shape in expected.items():
        t = state[key]
        if not (isinstance(t, Tensor) and t.is_floating_point()):
            raise bad(f"{key} is not a floating-point tensor")
        if tuple(t.shape) != shape:
            raise bad(f"{key} has shape {tuple(t.shape)}, expected {shape}")
        if not bool(torch.isfinite(t).all()):
            raise bad(f"{key} holds NaN or infinite values")


# --- ONNX format ------------------------------------------------------------------------------
def _onnx_bytes(net: nn.Module, arch: dict[str, Any]) -> bytes:
    """``net`` exported by ``torch.onnx.export(dynamo=True)`` (opset :data:`ONNX_OPSET`) with
    dynamic batch, height and width, ``arch`` stored as JSON in its metadata, serialized."""
    onnx = _require("onnx")
    from torch.export import Dim

    example = torch.zeros(2, arch["in_channels"], 24, 32)  # not 0 or 1: the tracer fixes those
    dims = ({0: Dim("batch"), 2: Dim("height"), 3: Dim("width")},)
    with _quiet() as chatter, torch.random.fork_rng(devices=[]):  # the exporter draws from the RNG
        try:
            program = torch.onnx.export(net, (example,), dynamo=True, dynamic_shapes=dims,
                                        input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                                        opset_version=ONNX_OPSET, verbose=False)
        except Exception:
            print(chatter.getvalue(), end="", file=sys.__stderr__)  # keep the exporter's story
            raise
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = ONNX_META_KEY, json.dumps(arch)
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


@contextlib.contextmanager
def _quiet():
    """Keep the exporter's prints, warnings and log lines (e.g. "torchvision is not installed")
    off stdout/stderr, where the CLI writes its results; yields what was printed."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with (contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink),
              warnings.catch_warnings()):
            warnings.simplefilter("ignore")
            yield sink
    finally:
        log.setLevel(level)


def onnx_session(model: bytes | Path, *, threads: int | None = None, defaults: bool = False,
                 optimized_path: Path | None = None):
    """An onnxruntime CPU session for an exported file (its bytes or its path), without the
    optimizers in :data:`ORT_DISABLED_OPTIMIZERS`; ``defaults=True``: onnxruntime's own choice.
    ``threads``: intra-op threads (inter-op 1); ``optimized_path``: where onnxruntime writes the
    graph it runs (to inspect it)."""
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    if threads is not None:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    off = [] if defaults else list(ORT_DISABLED_OPTIMIZERS)
    return ort.InferenceSession(str(model) if isinstance(model, Path) else model, options,
                                providers=["CPUExecutionProvider"], disabled_optimizers=off)


def _onnx_max_abs_diff(data: bytes, compact: nn.Module, inputs: Tensor,
                       atol: float = ATOL) -> float:
    """Run the ONNX bytes with onnxruntime (CPU; as :func:`onnx_session` runs them and with
    onnxruntime's defaults) on ``inputs`` and compare with ``compact``; the larger difference
    above ``atol`` → :class:`ExportMismatchError`."""
    def runner(session) -> Callable[[Tensor], Tensor]:
        def run(x: Tensor) -> Tensor:
            feed = {ONNX_INPUT: x.detach().to("cpu", torch.float32).contiguous().numpy()}
            return torch.from_numpy(session.run([ONNX_OUTPUT], feed)[0])
        return run

    diff = max(max_abs_diff(runner(onnx_session(data, defaults=d)), compact, inputs)
               for d in (False, True))
    if not diff <= atol:
        raise ExportMismatchError(f"onnxruntime output differs from PyTorch by {diff:.3g} "
                                  f"(> {atol:g}) on the check inputs; nothing was written")
    return diff


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(ONNX_EXTRA_MISSING) from None


# --- the whole export ---------------------------------------------------------------------------
@dataclass
class ExportReport:
    """What :func:`export` wrote and what the compaction saved."""

    path: Path
    format: str
    widths_before: tuple[int, ...]
    """Widths of the masked network (every mask, enabled or not)."""
    widths_after: tuple[int, ...]
    params_before: int
    """Weights + biases of the masked network, disabled masks included (it computes them all)."""
    params_after: int
    macs_before: int
    """Multiply-accumulates per output pixel, masked network."""
    macs_after: int
    max_abs_diff: float
    """max |masked − compact PyTorch| on the check inputs."""
    onnx_max_abs_diff: float | None
    """max |onnxruntime − compact PyTorch| on the check inputs (ONNX only)."""


def export(model: FCN, fmt: str, path: Path, *, check_inputs: Tensor,
           meta: dict[str, Any] | None = None, overwrite: bool = False) -> ExportReport:
    """Compact → verify against ``model`` on ``check_inputs`` (≤ 1e-5) → write ``path`` →
    (ONNX) verified with onnxruntime before the bytes are written. Nothing is written on failure.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format: unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    path = Path(path)
    _refuse_overwrite(path, overwrite)
    if fmt == "onnx":  # fail on a missing extra before any work
        for module in ("onnx", "onnxscript", "onnxruntime"):
            _require(module)
    compact = _for_export(compact_model(model))
    diff = verify_compact(model, compact, check_inputs)
    arch, state = architecture(compact, meta), _state_dict(compact)
    onnx_diff = None
    if fmt == "torch":
        save_state(path, {"architecture": arch, "state_dict": state})
    else:  # the exported graph is the plain recipe's network, checked against ``compact``
        data = _onnx_bytes(plain_torch_module(arch, state), arch)
        onnx_diff = _onnx_max_abs_diff(data, compact, check_inputs)
        atomic_write_bytes(path, data)
        # a replaced torch file's NAME.sha256 would describe bytes that are gone: remove it
        path.with_name(path.name + ".sha256").unlink(missing_ok=True)
    k, c = model.kernel, model.in_channels
    return ExportReport(
        path=path, format=fmt, widths_before=tuple(model.widths), widths_after=compact.widths,
        params_before=parameter_count(model.widths, k, c),
        params_after=parameter_count(compact.widths, k, c),
        macs_before=macs_per_pixel(model.widths, k, c),
        macs_after=macs_per_pixel(compact.widths, k, c),
        max_abs_diff=diff, onnx_max_abs_diff=onnx_diff)


def _for_export(compact: FCN) -> FCN:
    """Files hold float32 CPU tensors whatever the training dtype and device."""
    return compact.to(device="cpu", dtype=torch.float32).eval()


def _refuse_overwrite(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise ConfigError(f"--out: {path} is a directory; give a file name")
    if path.exists() and not overwrite:
        raise ConfigError(f"--out: {path} already exists; use --overwrite or another --out")


# --- speed --------------------------------------------------------------------------------------
def compare_speed(masked: nn.Module, compact: nn.Module, inputs: Tensor, repeats: int = 20,
                  warmup: int = 3) -> dict[str, float]:
    """Median seconds per forward of both networks, timed alternately in one run, and
    ``speedup`` = masked / compact. Measurements only: never assert them in tests."""
    t_masked, t_compact = _interleaved([masked, compact], inputs, repeats, warmup)
    return {"masked_s": t_masked, "compact_s": t_compact, "speedup": t_masked / t_compact}


def _interleaved(models: list[nn.Module], inputs: Tensor, repeats: int,
                 warmup: int) -> list[float]:
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    runs = []
    for m in models:  # copies: moving to channels_last must not change the caller's model
        m = copy.deepcopy(m).eval().to(memory_format=torch.channels_last)
        x = inputs.to(**_placement(m)).contiguous(memory_format=torch.channels_last)
        runs.append((m, x))
    times: list[list[float]] = [[] for _ in runs]
    with torch.no_grad():
        for i in range(warmup + repeats):
            for (m, x), t in zip(runs, times):
                _sync(x)
                start = time.perf_counter()
                m(x)
                _sync(x)
                if i >= warmup:
                    t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _sync(x: Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


def _placement(m: nn.Module | Callable) -> dict[str, Any]:
    """device and dtype of a module's first parameter (a plain callable takes CPU float32)."""
    p = next(m.parameters(), None) if isinstance(m, nn.Module) else None
    return {"device": p.device, "dtype": p.dtype} if p is not None else \
        {"device": "cpu", "dtype": torch.float32}


__all__ = ["ATOL", "ExportMismatchError", "ExportReport", "FORMATS", "architecture",
           "compact_model", "compare_speed", "export", "load_compact", "max_abs_diff",
           "plain_torch_module", "verify_compact"]
