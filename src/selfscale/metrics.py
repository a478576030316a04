"""Losses and quality metrics (soft F1, MAE, MSE, UIQI) as pure tensor functions."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

UIQI_BLOCK = 8
"""Side of the sliding UIQI window (``block_size`` default of Wang & Bovik's ``img_qi.m``)."""


def _check_pair(pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got pred {tuple(pred.shape)} "
                         f"and target {tuple(target.shape)}")
    if pred.dim() not in (3, 4) or (pred.dim() == 4 and pred.shape[1] != 1):
        raise ValueError(f"pred and target must be (N, 1, H, W) or (N, H, W), "
                         f"got {tuple(pred.shape)}")


def _per_image_sum(x: Tensor) -> Tensor:
    return x.flatten(1).sum(dim=1)


def _tp_and_error(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    _check_pair(pred, target)
    return _per_image_sum(pred * target), _per_image_sum((pred - target).abs())


def f1_score(pred: Tensor, target: Tensor) -> Tensor:
    """Soft F1 per image, shape (N,): ``2·TP / (2·TP + E)`` with ``TP = Σ pred·target`` and
    ``E = Σ |pred − target|`` (thesis 2.3.1; for binary pred and target E = FP + FN, so this is
    the usual F1). Where ``2·TP + E = 0`` (both images all zero) the score is 1.0: perfect
    agreement. Inputs are not clipped (network outputs are ReLU outputs, ≥ 0 but unbounded)."""
    tp, error = _tp_and_error(pred, target)
    denominator = 2 * tp + error
    defined = denominator != 0
    safe = torch.where(defined, denominator, torch.ones_like(denominator))
    return torch.where(defined, 2 * tp / safe, torch.ones_like(denominator))


def f1_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Scalar soft-F1 loss: batch mean of ``E / (2·TP + E)`` (= 1 − F1; thesis 2.3.1), with 0 for
    images where ``2·TP + E = 0``. The zero-denominator branch divides by 1 instead, so gradients
    stay finite (``|x|`` has gradient 0 at 0 in torch)."""
    tp, error = _tp_and_error(pred, target)
    denominator = 2 * tp + error
    defined = denominator != 0
    safe = torch.where(defined, denominator, torch.ones_like(denominator))
    return torch.where(defined, error / safe, torch.zeros_like(denominator)).mean()


def mae(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error per image, shape (N,): ``mean |pred − target|`` over H×W."""
    _check_pair(pred, target)
    return (pred - target).abs().flatten(1).mean(dim=1)


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per image, shape (N,): ``mean (pred − target)²`` over H×W."""
    _check_pair(pred, target)
    return (pred - target).square().flatten(1).mean(dim=1)


def _window_sums(x: Tensor) -> Tensor:
    """Sums over every 8×8 window ('valid', stride 1) of (N, C, H, W) float64 -> (N, C, H−7, W−7).

    Separable: 8-wide row sums, then 8-tall sums of those (16 additions per window instead of
    64; float64 sums of float32 products, equal to the direct sum to rounding). Average pooling
    times 8 is exact scaling (a power of two), so these are plain sums."""
    rows = F.avg_pool2d(x, (1, UIQI_BLOCK), stride=1) * float(UIQI_BLOCK)
    return F.avg_pool2d(rows, (UIQI_BLOCK, 1), stride=1) * float(UIQI_BLOCK)


def uiqi_map(pred: Tensor, target: Tensor) -> Tensor:
    """Universal Image Quality Index map (N, H−7, W−7), float64, exactly as ``img_qi.m``.

    Wang & Bovik, "A universal image quality index", IEEE SPL 9(3):81–84, 2002:
    ``Q = 4·σxy·x̄·ȳ / ((σx² + σy²)(x̄² + ȳ²))`` over every 8×8 window (sliding by one pixel).
    With window sums Sx, Sy, Sxx, Syy, Sxy and n = 64, as in the reference:
    ``num = 4 (n·Sxy − Sx·Sy)·Sx·Sy``, ``d1 = n (Sxx + Syy) − (Sx² + Sy²)``,
    ``d2 = Sx² + Sy²``, ``den = d1·d2``. The map starts at 1; where ``d1 = 0`` and ``d2 ≠ 0``
    (both windows constant, not both zero) ``Q = 2·Sx·Sy / d2``; where ``den ≠ 0``,
    ``Q = num / den``. Two all-zero windows therefore score 1, an all-zero window against a
    non-constant one 0. Q is symmetric in pred and target. Computed in float64 without gradient.
    """
    _check_pair(pred, target)
    height, width = pred.shape[-2:]
    if height < UIQI_BLOCK or width < UIQI_BLOCK:
        raise ValueError(f"uiqi needs images of at least {UIQI_BLOCK}×{UIQI_BLOCK} pixels, "
                         f"got {height}×{width}")
    fast = _uiqi_map_kernel(pred, target)
    if fast is not None:
        return fast
    x = pred.detach().to(torch.float64).reshape(-1, 1, height, width)
    y = target.detach().to(torch.float64).reshape(-1, 1, height, width)
    sums = _window_sums(torch.cat([x, y, x * x, y * y, x * y], dim=1))
    sx, sy, sxx, syy, sxy = sums.unbind(dim=1)
    n = float(UIQI_BLOCK * UIQI_BLOCK)
    sx_sy = sx * sy
    d2 = sx * sx + sy * sy
    numerator = 4 * (n * sxy - sx_sy) * sx_sy
    d1 = n * (sxx + syy) - d2
    denominator = d1 * d2
    ones = torch.ones_like(denominator)
    constant = (d1 == 0) & (d2 != 0)
    quality = torch.where(constant, 2 * sx_sy / torch.where(constant, d2, ones), ones)
    regular = denominator != 0
    return torch.where(regular, numerator / torch.where(regular, denominator, ones), quality)


def _uiqi_map_kernel(pred: Tensor, target: Tensor) -> Tensor | None:
    """:func:`uiqi_map` from the direct kernels' C++ loop (``ss_uiqi_map``), when they are
    loaded (``--conv direct``) and both images are float32 on the CPU; None otherwise. It does
    the same float64 operations in the same order, so the map is the same to the bit, about 20×
    faster: evaluation spent most of its time here."""
    from selfscale import direct

    lib = direct._library
    if (lib is None or pred.dtype != torch.float32 or target.dtype != torch.float32
            or pred.device.type != "cpu" or target.device.type != "cpu"):
        return None
    height, width = pred.shape[-2:]
    x = pred.detach().reshape(-1, height, width)
    y = target.detach().reshape(-1, height, width)
    out = torch.empty(x.shape[0], height - UIQI_BLOCK + 1, width - UIQI_BLOCK + 1,
                      dtype=torch.float64)
    strides = [(ctypes.c_long * 3)(*t.stride()) for t in (x, y)]
    lib.ss_uiqi_map(x.data_ptr(), strides[0], y.data_ptr(), strides[1], x.shape[0], height,
                    width, out.data_ptr(), torch.get_num_threads())
    return out


def uiqi(pred: Tensor, target: Tensor) -> Tensor:
    """UIQI per image, shape (N,), float64: the plain mean of :func:`uiqi_map` (``mean2`` in
    ``img_qi.m``). Images smaller than 8×8 raise ValueError."""
    return uiqi_map(pred, target).flatten(1).mean(dim=1)


def _mean_mae(pred: Tensor, target: Tensor) -> Tensor:
    return mae(pred, target).mean()


def _mean_mse(pred: Tensor, target: Tensor) -> Tensor:
    return mse(pred, target).mean()


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mae": _mean_mae,
    "mse": _mean_mse,
    "f1": f1_loss,
}
"""Training losses: (pred, target) -> scalar tensor, the mean over the batch."""


@dataclass(frozen=True)
class Metric:
    """A per-image quality measure: ``fn(pred, target) -> (N,)``."""

    name: str
    fn: Callable[[Tensor, Tensor], Tensor]
    higher_is_better: bool


METRICS: dict[str, Metric] = {
    "f1": Metric("f1", f1_score, higher_is_better=True),
    "mae": Metric("mae", mae, higher_is_better=False),
    "mse": Metric("mse", mse, higher_is_better=False),
    "uiqi": Metric("uiqi", uiqi, higher_is_better=True),
}


def evaluate_metrics(pred: Tensor, target: Tensor,
                     names: Sequence[str] = ("f1", "mae", "mse", "uiqi")) -> dict[str, float]:
    """Mean over the images of each named metric, as python floats."""
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    with torch.no_grad():
        return {name: float(METRICS[name].fn(pred, target).double().mean()) for name in names}
