"""Direct convolution: the FCN's forward and backward passes on the CPU without oneDNN.

oneDNN (PyTorch's CPU convolution) has a per-layer floor for the few channels these networks
have: a 1→1 5×5 layer costs nearly as much as a 5→5 one, so narrow networks and retrains hardly
get faster as masks go (issue 11). ``direct_conv.cpp`` holds plain SIMD kernels whose cost follows
the channel count. It is compiled on first use with the system's C++ compiler into the cache
folder (``$SELFSCALE_CACHE`` or ``~/.cache/selfscale``; one file per source, compiler and CPU,
written atomically) and loaded with :mod:`ctypes`.

The whole stack of layers is one :class:`torch.autograd.Function`: activations stay in zero-
padded planar buffers from one layer to the next, and the backward pass gives the weights and
biases their gradients (the input gets none). Disabled masks are skipped: their outputs stay zero
and their gradients are zero, which equals the masked network exactly. Without a gradient
(evaluation, inference) one kernel call runs every layer on one band of rows of one image at a
time (:func:`_banded_forward`), so the activations stay in the caches: the same bits.

Which implementation a process uses is set by :func:`use` (``--conv``): ``torch`` (PyTorch's
convolutions), ``direct``, or ``auto`` (direct when it compiles). A run records the one it
started with and every later command on the run uses that one, so a resumed run stays
bit-identical (same machine and thread count). The two implementations agree to float rounding
(about 1e-6 relative), not bit for bit. Anything the direct path does not cover falls back to
PyTorch: CUDA tensors, other dtypes, an input that needs a gradient, forward hooks on a layer,
tracing, ``torch.compile`` and ONNX export, layers wider than :data:`MAX_WIDTH`, even kernels
and kernels larger than :data:`MAX_KERNEL`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from selfscale.errors import ConfigError

if TYPE_CHECKING:
    from selfscale.model import FCN

MODES = ("auto", "direct", "torch")
MAX_WIDTH = 16
"""Widest layer (input or output channels) run by the direct kernels; wider goes to PyTorch."""
MAX_KERNEL = 15
"""Largest (odd) kernel run by the direct kernels: the weight gradient keeps 64 bytes per tap,
channel pair and thread, so larger kernels go to PyTorch."""
SOURCE = Path(__file__).with_name("direct_conv.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu++17")

_mode = "torch"
_library: ctypes.CDLL | None = None
_failure: str | None = None

_long, _int, _ptr, _dbl = ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_double


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _compile(cxx: str, folder: Path) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60,
                             check=True).stdout.splitlines()[0]
    key = hashlib.sha256("\n".join([SOURCE.read_text(), cxx, version, " ".join(FLAGS),
                                    platform.machine(), _cpu_flags()]).encode()).hexdigest()[:16]
    target = folder / f"direct_conv-{key}.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".direct_conv-", suffix=".so", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], check=False,
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError((done.stderr.strip().splitlines() or ["failed"])[0])
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first call; None (with :func:`failure` saying why) when
    there is no compiler or the build fails."""
    global _library, _failure
    if _library is not None or _failure is not None:
        return _library
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    try:
        if not cxx:
            raise RuntimeError("no C++ compiler (set CXX or install g++)")
        from selfscale.cache import cache_folder  # the data cache's root, read once

        lib = ctypes.CDLL(str(_compile(cxx, cache_folder(None) / "direct")))
        lib.ss_conv.argtypes = [_ptr, _long, _long, _ptr, _int, _ptr, _ptr, _long, _long, _long,
                                _int, _ptr, _int, _ptr, _int, _ptr, _int, _int, _int, _int, _int,
                                _int, _int, _int]
        lib.ss_pad_copy.argtypes = [_ptr, _long, _long, _long, _long, _ptr, _ptr, _long, _long,
                                    _int, _int, _int, _int, _int, _int]
        lib.ss_wgrad.argtypes = [_ptr, _long, _long, _ptr, _long, _long, _long, _ptr, _ptr, _ptr,
                                 _int, _ptr, _int, _int, _int, _int, _int, _int, _int, _int]
        lib.ss_step.argtypes = [_ptr, _ptr, _ptr, _ptr, _int, _int, _int, _int, _int, _ptr, _ptr,
                                _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _int, _dbl, _dbl, _dbl,
                                _dbl, _dbl, _int]
        lib.ss_step.restype = _dbl
        lib.ss_forward.argtypes = [_ptr, _ptr, _int, _int, _int, _int, _int, _ptr, _ptr, _ptr,
                                   _ptr, _ptr, _ptr, _int, _int]
        lib.ss_uiqi_map.argtypes = [_ptr, _ptr, _ptr, _ptr, _int, _int, _int, _ptr, _int]
        lib.ss_sample.argtypes = [_ptr, _int, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _int, _int,
                                  _int, _ptr, _ptr]
        lib.ss_integers_draw.argtypes = [_ptr, ctypes.c_uint64]
        lib.ss_stream_new.restype = _ptr
        lib.ss_stream_wait.argtypes = lib.ss_stream_free.argtypes = [_ptr]
        lib.ss_stream_sample.argtypes = [_ptr, *lib.ss_sample.argtypes]
        lib.ss_integers_draw.restype = ctypes.c_uint64
        # count, lrs, losses, stream, then ss_sample's from the bit generator to flips, the
        # two target buffers, then ss_step's from K to frozen and its options but lr
        lib.ss_steps.argtypes = [_int, _ptr, _ptr, _ptr, *lib.ss_sample.argtypes[:-2],
                                 _ptr, _ptr, *lib.ss_step.argtypes[7:19],
                                 *lib.ss_step.argtypes[20:]]
        lib.ss_steps.restype = _int
        lib.ss_sample_draws.argtypes = [_ptr, _int, _ptr, _ptr, _int, _int, _int, _int]
        _library = lib
    except (OSError, RuntimeError, subprocess.SubprocessError, IndexError) as exc:
        _failure = f"{type(exc).__name__}: {str(exc).strip()[:200]}"
    return _library


def failure() -> str | None:
    """Why the kernels could not be built (None when they were, or were not tried)."""
    return _failure


def use(mode: str) -> str:
    """Make this process use ``mode`` (one of :data:`MODES`) and return what it resolved to,
    ``direct`` or ``torch``. ``direct`` without a working compiler is a ConfigError."""
    global _mode
    if mode not in MODES:
        raise ConfigError(f"--conv: must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "torch" and library() is None:
        if mode == "direct":
            raise ConfigError(f"--conv direct: the direct convolution cannot be built here "
                              f"({failure()}); use --conv torch")
        mode = "torch"
    _mode = "direct" if mode == "auto" else mode
    return _mode


def current() -> str:
    """The implementation this process uses now: ``direct`` or ``torch``."""
    return _mode


def applicable(model: FCN, x: Tensor) -> bool:
    """Whether ``model(x)`` runs on the direct kernels (see the module docstring)."""
    if _mode != "direct" or _library is None:
        return False
    w = model.layers[0].weight
    if (x.device.type != "cpu" or w.device.type != "cpu" or x.dtype != torch.float32
            or w.dtype != torch.float32 or x.dim() != 4 or x.requires_grad
            or x.shape[1] != model.in_channels  # PyTorch's convolution says what is wrong
            or max(model.in_channels, *model.widths) > MAX_WIDTH
            or model.kernel % 2 == 0 or model.kernel > MAX_KERNEL):
        return False
    if (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()
            or torch.onnx.is_in_onnx_export()):
        return False
    hooks = torch.nn.modules.module  # global module hooks fire only around each layer's call
    if any(getattr(hooks, name, None) for name in (
            "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
            "_global_backward_pre_hooks")):
        return False
    return not any(layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks
                   or layer._backward_pre_hooks for layer in model.layers)


# --- buffers and kernel calls -------------------------------------------------------------------

def _padded(n: int, c: int, h: int, w: int, k: int, written: Tensor | None = None) -> Tensor:
    """A padded buffer for ``c`` planes. The kernels write every element of the planes in
    ``written`` (None: all), padding included; the others must be zero, so a buffer with
    planes left out starts zeroed."""
    shape = (n, c, h + k - 1, (w + 15) // 16 * 16 + k - 1)
    make = torch.empty if written is None or written.numel() == c else torch.zeros
    return make(shape, dtype=torch.float32, device="cpu")


def _pad_copy(src: Tensor, dst: Tensor, gate: Tensor | None, p: int) -> None:
    """dst (padded, every element written) = src inside, 0 around it; with ``gate``: 0 also
    where gate <= 0 (ReLU's gradient)."""
    n, c, h, w = src.shape
    _library.ss_pad_copy(src.data_ptr(), *src.stride(),
                         gate.data_ptr() if gate is not None else None, dst.data_ptr(),
                         dst.shape[2] * dst.shape[3], dst.shape[3], p, n, c, h, w,
                         torch.get_num_threads())


def _conv(src: Tensor, w: Tensor, b: Tensor | None, out: Tensor, pad: int | None,
          ref: Tensor | None, mode: int, outs: Tensor, ins: Tensor, h: int, wd: int,
          transposed: bool = False) -> None:
    """out = epilogue(conv(src, w) + b) on the masks ``outs`` from the input channels ``ins``;
    mode 0 plain, 1 ReLU, 2 zero where ref <= 0 (ReLU's gradient). ``pad``: out is a padded
    buffer with this border (its padding is written too), None: a dense (N, C, H, W) one.
    ``transposed``: w is a layer's weight, used flipped and transposed (its input gradient)."""
    cout, cin = (w.shape[1], w.shape[0]) if transposed else (w.shape[0], w.shape[1])
    _library.ss_conv(src.data_ptr(), src.shape[2] * src.shape[3], src.shape[3], w.data_ptr(),
                     int(transposed), b.data_ptr() if b is not None else None, out.data_ptr(),
                     out.shape[2] * out.shape[3], out.shape[3],
                     0 if pad is None else pad * out.shape[3] + pad, -1 if pad is None else pad,
                     ref.data_ptr() if ref is not None else None, mode, outs.data_ptr(),
                     outs.numel(), ins.data_ptr(), ins.numel(), src.shape[0], cin, cout, h, wd,
                     w.shape[-1], torch.get_num_threads())


_ALL: dict[int, Tensor] = {}


def _all_channels(c: int) -> Tensor:
    if c not in _ALL:
        _ALL[c] = torch.arange(c, dtype=torch.int32)
    return _ALL[c]


def _stack_forward(x: Tensor, weights: list[Tensor], biases: list[Tensor],
                   actives: list[Tensor]) -> list[Tensor]:
    """Every layer's output: padded buffers for the hidden layers, a dense (N, 1, H, W) tensor
    for the last; element 0 is the padded input."""
    n, c, h, wd = x.shape
    k = weights[0].shape[-1]
    p = k // 2
    cur = _padded(n, c, h, wd, k)
    _pad_copy(x, cur, None, p)
    outs = [cur]
    ins = _all_channels(c)
    for i, (w, b, act) in enumerate(zip(weights, biases, actives)):
        last = i == len(weights) - 1
        if last:
            make = torch.empty if act.numel() == w.shape[0] else torch.zeros
            out = make(n, w.shape[0], h, wd, dtype=torch.float32, device="cpu")
        else:
            out = _padded(n, w.shape[0], h, wd, k, act)
        _conv(cur, w, b, out, None if last else p, None, 1, act, ins, h, wd)
        outs.append(out)
        cur, ins = out, act
    return outs


class _Stack(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, actives: list[Tensor], *params: Tensor) -> Tensor:
        weights = [t.detach().contiguous() for t in params[0::2]]
        biases = [t.detach().contiguous() for t in params[1::2]]
        outs = _stack_forward(x, weights, biases, actives)
        ctx.save_for_backward(*outs, *weights)
        ctx.actives = actives
        return outs[-1]

    @staticmethod
    @once_differentiable  # the gradients carry no graph: a second derivative is an error
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        layers = len(ctx.actives)
        outs, weights = saved[:layers + 1], saved[layers + 1:]
        n, _, h, wd = gy.shape
        gy = gy.float()
        k = weights[0].shape[-1]
        p = k // 2
        y = outs[-1]
        g = _padded(n, y.shape[1], h, wd, k)
        _pad_copy(gy, g, y, p)
        off = p * g.shape[3] + p
        grads: list[Tensor | None] = [None] * (2 * layers)
        for i in range(layers - 1, -1, -1):
            w, src = weights[i], outs[i]
            outs_i = ctx.actives[i]
            ins = ctx.actives[i - 1] if i > 0 else _all_channels(w.shape[1])
            gw = torch.zeros_like(w)
            gb = torch.zeros(w.shape[0], dtype=torch.float32, device="cpu")
            _library.ss_wgrad(src.data_ptr(), src.shape[2] * src.shape[3], src.shape[3],
                              g.data_ptr(), g.shape[2] * g.shape[3], g.shape[3], off,
                              gw.data_ptr(), gb.data_ptr(), outs_i.data_ptr(), outs_i.numel(),
                              ins.data_ptr(), ins.numel(), n, w.shape[1], w.shape[0], h, wd,
                              k, torch.get_num_threads())
            grads[2 * i], grads[2 * i + 1] = gw, gb
            if i > 0:  # the gradient of the previous layer's pre-activation, in its padded layout
                prev = _padded(n, w.shape[1], h, wd, k, ins)
                _conv(g, w, None, prev, p, src, 2, ins, outs_i, h, wd, transposed=True)
                g = prev
        return (None, None, *grads)


def _gated(model: FCN) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    weights, biases, actives = [], [], []
    for layer in model.layers:
        weight, bias = layer.gated()
        weights.append(weight)
        biases.append(bias)
        actives.append(layer.active_indices())
    return weights, biases, actives


BAND_ROWS = 64
"""Output rows of one band of an inference pass (``ss_forward``)."""


def _pointers(ts: list[Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts])


def _banded_forward(x: Tensor, weights: list[Tensor], biases: list[Tensor],
                    actives: list[Tensor]) -> Tensor:
    """The stack's output, one image and one band of :data:`BAND_ROWS` rows through every
    layer at a time (``ss_forward``, which copies x's rows into its padded band buffers): the
    same values as :func:`_stack_forward`'s last."""
    n, c, h, wd = x.shape
    last, act = weights[-1], actives[-1]
    make = torch.empty if act.numel() == last.shape[0] else torch.zeros
    out = make(n, last.shape[0], h, wd, dtype=torch.float32, device="cpu")
    chans = (ctypes.c_int * (len(weights) + 1))(c, *[w.shape[0] for w in weights])
    nact = (ctypes.c_int * len(actives))(*[a.numel() for a in actives])
    _library.ss_forward(x.data_ptr(), (ctypes.c_long * 4)(*x.stride()), n, h, wd,
                        weights[0].shape[-1], len(weights), chans, _pointers(weights),
                        _pointers(biases), _pointers(actives), nact, out.data_ptr(), BAND_ROWS,
                        torch.get_num_threads())
    return out


def forward(model: FCN, x: Tensor) -> Tensor:
    """``model(x)`` on the direct kernels (call only when :func:`applicable`)."""
    weights, biases, actives = _gated(model)
    if torch.is_grad_enabled() and any(t.requires_grad for t in weights + biases):
        params = [t for pair in zip(weights, biases) for t in pair]
        return _Stack.apply(x, actives, *params)
    return _banded_forward(x, [w.detach().contiguous() for w in weights],
                           [b.detach().contiguous() for b in biases], actives)


def layer_outputs(model: FCN, x: Tensor) -> list[Tensor]:
    """Every layer's output (after its ReLU) for ``model(x)``, (N, C, H, W) each, without
    gradient; the last is what :func:`forward` returns (call only when :func:`applicable`)."""
    weights, biases, actives = _gated(model)
    with torch.no_grad():
        outs = _stack_forward(x, [w.detach().contiguous() for w in weights],
                              [b.detach().contiguous() for b in biases], actives)[1:]
    p, (h, wd) = model.kernel // 2, x.shape[2:]
    return [o[:, :, p:p + h, p:p + wd] for o in outs[:-1]] + [outs[-1]]
