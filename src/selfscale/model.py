"""The fully convolutional network of thesis 2.3, with an *enabled* and a *frozen* switch per mask.

A *mask* is one output channel of a convolution layer together with its bias (thesis 2.3). Every
mask has two switches, stored as boolean buffers so they travel with ``state_dict``:

* ``enabled``: a disabled mask outputs exactly zero whatever its input (its weights and bias are
  multiplied by 0 in the forward pass, so it also receives zero gradient). The stored values are
  kept, so enabling the mask again restores it.
* ``frozen``: a frozen mask still produces output but receives no update from back-propagation
  (its gradients are zeroed by a hook). With Adam, reset the optimizer after freezing so that old
  moments cannot move the mask (the minimization loop does this after every alteration, thesis 2.4).

Layers: ``Conv2d(k×k, stride 1, dilation 1, 'same' zero padding, bias)`` each followed by ReLU,
including the output layer, whose width is 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfscale import direct

TRUNC_STDS = 2.0  # values beyond 2 standard deviations are redrawn (thesis 2.3)
INITS = ("he", "trunc-normal")


def trunc_normal_(tensor: Tensor, std: float, generator: torch.Generator | None = None) -> Tensor:
    """Fill ``tensor`` in place from N(0, std²) truncated to [−2·std, 2·std] (thesis 2.3).

    Sampling by inverse CDF gives the same distribution as redrawing values outside the bounds.
    Values are drawn on the CPU (``generator`` is a CPU generator) into a tensor with the same
    memory layout (the draw fills memory in order, so a channels_last weight gets its values in
    channels_last order), then copied to the tensor's device: a seed gives the same weights on
    every device.
    """
    with torch.no_grad():
        draw = torch.empty_like(tensor, dtype=torch.float32, device="cpu")
        nn.init.trunc_normal_(draw, mean=0.0, std=std, a=-TRUNC_STDS * std, b=TRUNC_STDS * std,
                              generator=generator)
        return tensor.copy_(draw)


@dataclass(frozen=True)
class Init:
    """How masks are drawn, at the start and when the minimization redraws one.

    * ``trunc-normal`` (thesis 2.3): weights and biases from N(0, std²) truncated to ±2·std.
    * ``he`` (He et al. 2015, for ReLU networks): weights from N(0, 2/fan_in) truncated to
      ±2 std, with fan_in = input channels × k × k; biases set to ``bias`` (a small positive
      value keeps ReLUs from starting dead).
    """

    kind: str = "trunc-normal"
    std: float = 0.05
    """trunc-normal: the std of weights and biases."""
    bias: float = 0.01
    """he: the value of every bias."""

    def draw_(self, weight: Tensor, bias: Tensor, generator: torch.Generator | None) -> None:
        """Fill one layer's (or one mask's) weight and bias in place."""
        if self.kind == "he":
            fan_in = weight.shape[-3] * weight.shape[-2] * weight.shape[-1]
            trunc_normal_(weight, math.sqrt(2.0 / fan_in), generator)
            with torch.no_grad():
                bias.fill_(self.bias)
        else:
            trunc_normal_(weight, self.std, generator)
            trunc_normal_(bias, self.std, generator)


def as_init(init: Init | float) -> Init:
    """A float is the thesis's truncated normal with that std."""
    return init if isinstance(init, Init) else Init("trunc-normal", float(init))


class MaskedConv2d(nn.Conv2d):
    """A 'same'-padded convolution whose output channels (masks) can be disabled or frozen."""

    enabled: Tensor
    frozen: Tensor

    def __init__(self, in_channels: int, out_channels: int, kernel: int) -> None:
        super().__init__(in_channels, out_channels, kernel, stride=1, padding=kernel // 2,
                         dilation=1, bias=True)
        self.register_buffer("enabled", torch.ones(out_channels, dtype=torch.bool))
        self.register_buffer("frozen", torch.zeros(out_channels, dtype=torch.bool))
        self._switch_cache: dict[str, tuple[Tensor, int, Any]] = {}
        self.weight.register_hook(self._mask_weight_grad)
        self.bias.register_hook(self._mask_bias_grad)

    def __getstate__(self) -> dict[str, Any]:
        """A copy (``copy.deepcopy``, pickle) starts without the switch cache: its switches
        restart at version 1, which a cached entry could match by chance."""
        return {**self.__dict__, "_switch_cache": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A copied parameter comes without the hooks of the one it copies: the frozen masks'
        gradient hooks are registered again (on parameters that take gradients)."""
        super().__setstate__(state)
        for p, hook in ((self.weight, self._mask_weight_grad), (self.bias, self._mask_bias_grad)):
            if p.requires_grad and not p._backward_hooks:
                p.register_hook(hook)

    def _derived(self, key: str, name: str, compute: Callable[[Tensor], Any]) -> Any:
        """``compute(switch)`` for switch ``name``, cached under ``key`` until the switch changes
        (a tensor's ``_version`` counts its in-place changes; holding the tensor keeps its
        identity unique): no device sync and no extra kernels per step on the common path."""
        switch = getattr(self, name)
        cached = self._switch_cache.get(key)
        if cached is None or cached[0] is not switch or cached[1] != switch._version:
            cached = (switch, switch._version, compute(switch))
            self._switch_cache[key] = cached
        return cached[2]

    def _all(self, name: str, value: bool) -> bool:
        """Whether every entry of switch ``name`` equals ``value`` (cached, :meth:`_derived`)."""
        if torch.compiler.is_compiling():  # traced: the general path, which inductor fuses
            return False
        return self._derived(name, name, lambda switch: bool((switch == value).all()))

    def _mask_weight_grad(self, grad: Tensor) -> Tensor:
        if self._all("frozen", False):
            return grad
        return grad * (~self.frozen).to(grad.dtype).view(-1, 1, 1, 1)

    def _mask_bias_grad(self, grad: Tensor) -> Tensor:
        if self._all("frozen", False):
            return grad
        return grad * (~self.frozen).to(grad.dtype)

    def gated(self) -> tuple[Tensor, Tensor]:
        """Weight and bias with the disabled masks' entries multiplied by 0."""
        if self._all("enabled", True):  # x·1 is exact: the same values, two kernels fewer
            return self.weight, self.bias
        gate = self.enabled.to(self.weight.dtype)
        return self.weight * gate.view(-1, 1, 1, 1), self.bias * gate

    def active_indices(self) -> Tensor:
        """The enabled masks' indices (int32, on the CPU), cached until the switch changes."""
        return self._derived("indices", "enabled",
                             lambda switch: torch.nonzero(switch.cpu()).flatten().to(torch.int32))

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.gated()
        return F.conv2d(x, weight, bias, padding=self.padding)


class FCN(nn.Module):
    """``len(widths)`` masked convolution layers with ReLU after each; ``widths[-1]`` must be 1."""

    def __init__(self, widths: Sequence[int], kernel: int = 5, in_channels: int = 1) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths or widths[-1] != 1 or min(widths) < 1:
            raise ValueError(f"widths must be positive and end with 1, got {widths}")
        self.widths = widths
        self.kernel = int(kernel)
        self.in_channels = int(in_channels)
        ins = (self.in_channels, *widths[:-1])
        self.layers = nn.ModuleList(MaskedConv2d(i, o, self.kernel) for i, o in zip(ins, widths))

    def forward(self, x: Tensor) -> Tensor:
        if direct.applicable(self, x):  # the direct kernels (``--conv``), same values
            return direct.forward(self, x)
        for layer in self.layers:
            x = F.relu(layer(x))
        return x

    def reset_parameters(self, init: Init | float,
                         generator: torch.Generator | None = None) -> None:
        """Draw every layer's weights and biases, in layer order (a float: the thesis's
        truncated normal with that std)."""
        for layer in self.layers:
            as_init(init).draw_(layer.weight, layer.bias, generator)

    # --- switches -----------------------------------------------------------------------------
    def set_enabled(self, layer: int, mask: int, value: bool) -> None:
        self.layers[layer].enabled[mask] = bool(value)

    def set_frozen(self, layer: int, mask: int, value: bool) -> None:
        self.layers[layer].frozen[mask] = bool(value)

    def reinit_mask(self, layer: int, mask: int, init: Init | float,
                    generator: torch.Generator | None = None) -> None:
        """Redraw one mask's weights and bias from the initial distribution (thesis 2.4)."""
        conv = self.layers[layer]
        with torch.no_grad():
            as_init(init).draw_(conv.weight[mask], conv.bias[mask : mask + 1], generator)

    def enabled_masks(self) -> list[list[bool]]:
        """Per layer, which masks are enabled (the thesis's one-hot mask matrix)."""
        return [layer.enabled.tolist() for layer in self.layers]

    def frozen_masks(self) -> list[list[bool]]:
        return [layer.frozen.tolist() for layer in self.layers]

    def active_widths(self) -> tuple[int, ...]:
        """Number of enabled masks per layer."""
        return tuple(int(layer.enabled.sum()) for layer in self.layers)


def parameter_count(widths: Sequence[int], kernel: int, in_channels: int = 1) -> int:
    """Weights plus biases of an FCN with these widths, e.g. (5, 5, 1), k=5 → 886 (thesis net)."""
    total, prev = 0, in_channels
    for w in widths:
        total += prev * w * kernel * kernel + w
        prev = w
    return total


def macs_per_pixel(widths: Sequence[int], kernel: int, in_channels: int = 1) -> int:
    """Multiply-accumulates per output pixel (bias additions not counted)."""
    total, prev = 0, in_channels
    for w in widths:
        total += prev * w * kernel * kernel
        prev = w
    return total


def active_parameter_count(model: FCN) -> int:
    """Parameters that remain when disabled masks (and the input channels they feed) are removed."""
    total, prev = 0, model.in_channels
    for layer in model.layers:
        w = int(layer.enabled.sum())
        total += prev * w * model.kernel**2 + w
        prev = w
    return total


def active_macs_per_pixel(model: FCN) -> int:
    return macs_per_pixel(model.active_widths(), model.kernel, model.in_channels)


@torch.no_grad()
def mask_activity(model: FCN, inputs: Iterable[Tensor]) -> list[Tensor]:
    """Per layer, the share of pixels (over every input batch) where each mask's output (after
    its ReLU) is positive: 0.0 marks a *dead* mask, one that outputs zero on all those pixels."""
    counts = [torch.zeros(layer.out_channels, dtype=torch.float64) for layer in model.layers]
    total = 0
    for x in inputs:
        total += x.shape[0] * x.shape[2] * x.shape[3]
        for i, out in enumerate(layer_outputs(model, x)):
            counts[i] += (out > 0).sum(dim=(0, 2, 3)).double().cpu()
    return [c / max(total, 1) for c in counts]


@torch.no_grad()
def layer_outputs(model: FCN, x: Tensor) -> list[Tensor]:
    """Every layer's output (after its ReLU), (N, C, H, W) each, computed as ``model(x)``
    computes it (the last is ``model(x)``)."""
    if direct.applicable(model, x):
        return direct.layer_outputs(model, x)
    outputs = []
    for layer in model.layers:
        x = F.relu(layer(x))
        outputs.append(x)
    return outputs


def dead_masks(activity: list[Tensor], model: FCN) -> list[tuple[int, int]]:
    """(layer, mask) of the enabled hidden masks with zero activity that can be removed: never
    the output layer's mask, and never the last enabled mask of a layer."""
    out = []
    for i, (act, layer) in enumerate(zip(activity[:-1], model.layers[:-1])):
        enabled = layer.enabled.tolist()
        dead = [k for k, on in enumerate(enabled) if on and float(act[k]) == 0.0]
        if len(dead) == sum(enabled):
            dead = dead[1:]  # keep one: a layer with no mask left would cut the network
        out += [(i, k) for k in dead]
    return out


def receptive_field(n_layers: int, kernel: int) -> int:
    """Side of the receptive field of ``n_layers`` stride-1 k×k layers: 3 layers of 5×5 → 13."""
    return n_layers * (kernel - 1) + 1


def build_model(widths: Sequence[int], kernel: int, in_channels: int, init: Init | float,
                seed: int) -> FCN:
    """A freshly initialized FCN; the same seed always gives the same weights."""
    model = FCN(widths, kernel, in_channels)
    gen = torch.Generator().manual_seed(seed)
    model.reset_parameters(init, gen)
    return model
