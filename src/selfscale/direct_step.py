"""A whole training step in one call of the direct kernels (``--conv direct``).

On narrow networks a training step is mostly not arithmetic: with PyTorch driving the direct
kernels, a 1/1/1 step on 3 crops of 64² spent more time in Python, autograd, the loss's dozen
small tensor ops, the fused Adam's bookkeeping and a score of kernel calls (each with its ctypes
and OpenMP entry) than in its convolutions, so retrains did not get much cheaper as masks went
(issue 11). :func:`train_step` hands the step to ``ss_step`` in ``direct_conv.cpp``, which runs in
one call what :func:`selfscale.train.train_step` does:

1. the forward pass through every layer (the same kernels as :mod:`selfscale.direct`),
2. the loss (``mae``, ``mse`` or ``f1`` of :data:`selfscale.metrics.LOSSES`; 16 float lanes per
   row, each lane summed over the rows in double, then the lanes) and its gradient times ReLU's,
3. the backward pass, zeroing the frozen masks' gradients (the layers' gradient hooks),
4. gradient-norm clipping as ``torch.nn.utils.clip_grad_norm_`` (``--clip``), and
5. Adam as ``torch.optim.Adam`` (no weight decay, no amsgrad): each parameter's step count,
   ``m ← m + (1 − β₁)(g − m)``, ``v ← β₂ v + (1 − β₂) g²``,
   ``p ← p − lr / (1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)``,

updating the parameters, moments and step counts of the optimizer's own state in place, through
their strides: checkpoints, resume and ``state_dict`` see an ordinary Adam. The result equals
the autograd path to float rounding (the loss is summed in another order, the update's products
may be fused), not bit for bit; one machine and thread count give one result. No ``.grad`` is left
on the parameters. Anything else (another optimizer or option, hooks on a parameter or the
optimizer, another loss, an input or target it does not cover) takes the autograd path.

:func:`train_steps` runs several such steps in one call (``ss_steps``), each on the next batch
of a :class:`~selfscale.crops.BatchStream`, drawn in the kernel the way
:func:`~selfscale.crops.sample_batch` draws it: the training loop uses it between two pauses
when no hook looks at single steps, so a narrow network's step no longer pays for the Python
around the call and the copy of its batch (made on a helper thread during the step before).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.optim import optimizer as _optim

from selfscale import direct
from selfscale.crops import BatchStream
from selfscale.metrics import LOSSES
from selfscale.model import FCN, MaskedConv2d, active_macs_per_pixel

LOSS_CODES = {"mae": 0, "mse": 1, "f1": 2}
"""The losses ``ss_step`` computes, by name in :data:`selfscale.metrics.LOSSES`."""

_OWN_HOOKS = (MaskedConv2d._mask_weight_grad, MaskedConv2d._mask_bias_grad)
_CODE_OF = {LOSSES[name]: code for name, code in LOSS_CODES.items()}


def loss_code(loss_fn: Callable[[Tensor, Tensor], Tensor]) -> int | None:
    """The ``ss_step`` code of a loss function of :data:`selfscale.metrics.LOSSES` (None: not
    one it computes)."""
    return _CODE_OF.get(loss_fn)


def _plain_param(p: Tensor, layer: MaskedConv2d) -> bool:
    """A float32 CPU leaf whose only gradient hook is its layer's frozen-mask hook."""
    if not (p.requires_grad and p.dtype == torch.float32 and p.is_cpu) \
            or p._post_accumulate_grad_hooks:
        return False
    hooks = p._backward_hooks
    for hook in hooks.values() if hooks else ():
        if getattr(hook, "__func__", None) not in _OWN_HOOKS or hook.__self__ is not layer:
            return False
    return True


def _plain_adam(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> dict | None:
    """The one parameter group of a torch Adam over exactly ``params`` with the options
    ``ss_step`` runs and no step hooks (None otherwise)."""
    if type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1 \
            or optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks \
            or _optim._global_optimizer_pre_hooks or _optim._global_optimizer_post_hooks:
        return None
    group = optimizer.param_groups[0]
    mine = group["params"]
    if (len(mine) != len(params) or any(a is not b for a, b in zip(mine, params))
            or group["weight_decay"] or group["amsgrad"] or group["maximize"]
            or group.get("differentiable") or group.get("capturable")
            or group.get("decoupled_weight_decay") or isinstance(group["lr"], Tensor)):
        return None
    return group


def _plain_state(entry: dict, p: Tensor) -> bool:
    """An Adam state entry ``ss_step`` can update in place: float32 CPU moments with the
    parameter's shape and strides and a float32 step count."""
    if entry.keys() != {"step", "exp_avg", "exp_avg_sq"}:
        return False
    step, shape, stride = entry["step"], p.shape, p.stride()
    return (isinstance(step, Tensor) and step.numel() == 1 and step.dtype == torch.float32
            and step.device.type == "cpu"
            and all(m.shape == shape and m.stride() == stride and m.dtype == torch.float32
                    and m.device.type == "cpu" for m in (entry["exp_avg"], entry["exp_avg_sq"])))


def _state_tensors(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> list:
    """Per parameter, its state's (exp_avg, exp_avg_sq, step) tensors, or None before the
    first step."""
    out = []
    for p in params:
        entry = optimizer.state.get(p)
        out.append((entry.get("exp_avg"), entry.get("exp_avg_sq"), entry.get("step"))
                   if entry else None)
    return out


def _same(a: Sequence, b: Sequence | None) -> bool:
    """Whether two sequences hold the same objects (identity, not value)."""
    return b is not None and len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _prepared(model: FCN, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
              loss_fn: Callable[[Tensor, Tensor], Tensor]) -> tuple | None:
    """(loss code, group, layers, parameters, their state tensors) of a step ``ss_step`` runs,
    None for any other."""
    code = _CODE_OF.get(loss_fn)
    if code is None or not torch.is_grad_enabled() or not direct.applicable(model, x):
        return None
    if (y.device.type != "cpu" or y.dtype != torch.float32 or y.dim() != 4
            or y.shape[0] != x.shape[0] or y.shape[1] != model.widths[-1]
            or y.shape[2:] != x.shape[2:] or y.stride(3) != 1):
        return None
    layers = list(model.layers)
    params = [t for layer in layers for t in (layer.weight, layer.bias)]
    group = _plain_adam(optimizer, params)
    if group is None:
        return None
    for i, p in enumerate(params):
        if not _plain_param(p, layers[i // 2]) or (i % 2 and p.stride(0) != 1):
            return None
    # the state's tensors are checked again only when they or their memory change: the same
    # objects (held by the optimizer, so their ids cannot be reused) at the same addresses with
    # the same strides (``p.data = …``, as Module.to does, keeps the object and moves the memory)
    tensors = _state_tensors(optimizer, params)
    flat = tuple(t for entry in tensors if entry for t in entry)
    layout = tuple((t.data_ptr(), t.stride()) for t in (*params, *flat))
    checked = getattr(optimizer, "_ss_checked", None)
    if checked is None or not _same(flat, checked[0]) or checked[1] != layout:
        if any(not _plain_state(optimizer.state[p], p) for p, t in zip(params, tensors) if t):
            return None
        optimizer._ss_checked = (flat, layout)
    return code, group, layers, params, tensors, layout


def applicable(model: FCN, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
               loss_fn: Callable[[Tensor, Tensor], Tensor]) -> bool:
    """Whether :func:`train_step` runs this step (see the module docstring)."""
    return _prepared(model, optimizer, x, y, loss_fn) is not None


def _array(kind: type, values: Sequence) -> ctypes.Array:
    return (kind * len(values))(*values)


def train_step(model: FCN, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
               loss_fn: Callable[[Tensor, Tensor], Tensor], clip: float = 0.0) -> float | None:
    """One Adam step on one batch in one kernel call; returns the loss before the update, as
    :func:`selfscale.train.train_step` does, or None, having changed nothing, when the step is
    not one it runs."""
    step = _step_args(model, optimizer, x, y, loss_fn)
    if step is None:
        return None
    group, model_args = step
    n, _, h, w = x.shape
    return direct._library.ss_step(
        x.data_ptr(), _array(ctypes.c_long, x.stride()), y.data_ptr(),
        _array(ctypes.c_long, y.stride()), n, h, w, *model_args, float(group["lr"]),
        *_options(group, clip))


STEPS_PER_CALL = 64
"""The most steps :func:`train_steps` runs (one kernel call: an interrupt waits for it)."""
MACS_PER_CALL = 10**9
"""About the most forward multiply-adds a call of :func:`train_steps` is given (a few tenths
of a second of CPU with the backward pass), so an interrupt or a progress bar waits no longer."""


def steps_per_call(model: FCN, batch: int, crop: int) -> int:
    """How many steps :func:`train_steps` is given at once for ``batch`` crops of ``crop``²:
    :data:`STEPS_PER_CALL`, fewer for large batches or wide networks (:data:`MACS_PER_CALL`),
    at least 1."""
    work = batch * crop * crop * max(active_macs_per_pixel(model), 1)
    return max(1, min(STEPS_PER_CALL, MACS_PER_CALL // work))


def train_steps(model: FCN, optimizer: torch.optim.Optimizer, batches: BatchStream,
                lrs: Sequence[float] | None, count: int,
                loss_fn: Callable[[Tensor, Tensor], Tensor], clip: float = 0.0) -> list[float] | None:
    """``count`` (≤ :data:`STEPS_PER_CALL`) steps of :func:`train_step`, each on the next batch
    of ``batches``, at learning rates ``lrs`` (None: the group's), in one kernel call that
    samples the batches itself (``ss_steps``): the same batches, generator state and results as
    ``count`` rounds of ``batches.take`` and :func:`train_step`, without the Python between them,
    and the next batch copied on the stream's helper thread during each step. Returns the
    losses, fewer when one is not finite (that one last; the generator is then where those
    steps leave it), or None, having changed nothing, when the steps are not ones it runs."""
    sampler = batches.kernel_args() if 0 < count <= STEPS_PER_CALL else None
    if sampler is None:
        return None
    x0, y0, _, y1 = batches.buffers()  # x0: the batch's shape; the kernel pads its own input
    step = _step_args(model, optimizer, torch.from_numpy(x0), torch.from_numpy(y0), loss_fn)
    if step is None:
        return None
    group, model_args = step
    stream, rng, *sample_args = sampler
    lrs = [float(group["lr"])] * count if lrs is None else [float(lr) for lr in lrs]
    bits, out = rng.bit_generator, (ctypes.c_double * count)()
    with bits.lock:
        before = bits.state
        done = direct._library.ss_steps(
            count, _array(ctypes.c_double, lrs), out, stream, bits.ctypes.bit_generator,
            *sample_args, y0.ctypes.data, y1.ctypes.data,
            *model_args, *_options(group, clip))
    if done < count:  # it diverged: the draws of the batch after that step are undone
        batches.rewind(before, done)
    group["lr"] = lrs[done - 1]
    return out[:done]


def _options(group: dict, clip: float) -> tuple[float, float, float, float, int]:
    """``ss_step``'s arguments after the learning rate: Adam's betas and eps, the clip norm
    and the thread count."""
    beta1, beta2 = group["betas"]
    return (float(beta1), float(beta2), float(group["eps"]), float(clip),
            torch.get_num_threads())


def _step_args(model: FCN, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
               loss_fn: Callable[[Tensor, Tensor], Tensor]) -> tuple[dict, tuple] | None:
    """The parameter group and ``ss_step``'s arguments from the kernel size to the loss code
    of a step it runs (None for any other), the Adam state created if missing and the
    parameters' gradients dropped."""
    prepared = _prepared(model, optimizer, x, y, loss_fn)
    if prepared is None:
        return None
    code, group, layers, params, tensors, layout = prepared
    if not all(tensors):  # as Adam's first step creates them
        for p, t in zip(params, tensors):
            if t is None:
                optimizer.state[p] = {"step": torch.tensor(0.0, dtype=torch.float32),
                                      "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}
        tensors = _state_tensors(optimizer, params)
        layout = tuple((t.data_ptr(), t.stride())
                       for t in (*params, *(t for entry in tensors for t in entry)))
    for p in params:
        p.grad = None
    actives = [layer.active_indices() for layer in layers]
    frozen = [None if layer._all("frozen", False) else layer.frozen for layer in layers]
    return group, (*_model_args(optimizer, model, params, tensors, actives, frozen, layout), code)


def _model_args(optimizer: torch.optim.Optimizer, model: FCN, params: list[Tensor],
                tensors: list, actives: list[Tensor], frozen: list[Tensor | None],
                layout: tuple) -> tuple:
    """``ss_step``'s arguments from the kernel size to the frozen switches: arrays of pointers
    and strides, kept on the optimizer while the same tensor objects are passed (they are
    updated in place; the cache holds them, so their ids cannot be reused) and the parameters
    and state keep their memory and strides (``layout``: a parameter's ``.data`` can be
    replaced under the same object)."""
    objects = (*params, *(t for entry in tensors for t in entry), *actives, *frozen)
    cached = getattr(optimizer, "_ss_args", None)
    if cached is not None and _same(objects, cached[0]) and cached[2] == layout:
        return cached[1]
    ptr, long_, int_ = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    args = (model.kernel, len(actives), _array(int_, [model.in_channels, *model.widths]),
            _array(ptr, [p.data_ptr() for p in params]),
            _array(long_, [s for p in params[0::2] for s in p.stride()]),
            *(_array(ptr, [entry[i].data_ptr() for entry in tensors]) for i in range(3)),
            _array(ptr, [a.data_ptr() for a in actives]),
            _array(int_, [a.numel() for a in actives]),
            _array(ptr, [None if f is None else f.data_ptr() for f in frozen]))
    optimizer._ss_args = (objects, args, layout)
    return args
