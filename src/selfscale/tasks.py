"""Target operators (sobel, canny, otsu, pairs) as pure functions on whole images + a registry."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import skimage.feature
import skimage.filters
from scipy import ndimage as ndi

from selfscale.errors import ConfigError

BORDER_MODES = ("reflect", "nearest", "mirror", "wrap", "constant")
"""Border modes of :mod:`scipy.ndimage` accepted by the operators' ``mode`` parameter."""

SOBEL_EDGE = np.array([1.0, 0.0, -1.0])
"""Sobel derivative taps (scikit-image ``filters.edges.SOBEL_EDGE``)."""
SOBEL_SMOOTH = np.array([1.0, 2.0, 1.0]) / 4.0
"""Sobel smoothing taps, normalised to sum 1 (scikit-image ``filters.edges.SOBEL_SMOOTH``)."""
SOBEL_ROWS = np.outer(SOBEL_EDGE, SOBEL_SMOOTH)
"""3×3 kernel differentiating along axis 0 (rows, y) and smoothing along axis 1."""
SOBEL_COLS = SOBEL_ROWS.T.copy()
"""3×3 kernel differentiating along axis 1 (columns, x) and smoothing along axis 0."""
SOBEL_NORMALIZE = ("none", "max")
"""Output scalings of the sobel operator: ``none`` (absolute, the default) or per-image ``max``."""

CANNY_SIGMA = math.sqrt(2.0)
"""MATLAB ``edge(I,'canny')`` Gaussian width."""
CANNY_TRUNCATE = 4.0
"""Gaussian radius in sigmas: scipy keeps int(4σ + 0.5) = 6 taps a side for σ = √2, 13 in all,
the same as MATLAB's ±⌈4σ⌉."""
CANNY_HIST_BINS = 64
"""MATLAB builds the automatic threshold from a 64-bin ``imhist`` of the normalised magnitude."""
CANNY_HIGH_FRACTION = 0.7
"""MATLAB ``PercentOfPixelsNotEdges``: share of pixels below the high threshold."""
CANNY_LOW_RATIO = 0.4
"""MATLAB ``ThresholdRatio``: low threshold = ratio × high threshold."""
CANNY_MODE = "nearest"
"""MATLAB filters with ``imfilter(..., 'replicate')``, which is scipy's ``nearest``."""

OTSU_NBINS = 256
"""Histogram bins of :func:`skimage.filters.threshold_otsu` (its default)."""


@dataclass(frozen=True)
class Rule:
    """A constraint on one parameter: ``ok(value, params)`` must hold; ``text`` states the rule."""

    ok: Callable[[Any, Mapping[str, Any]], bool]
    text: str


@dataclass(frozen=True)
class Task:
    """One target operator and everything needed to reproduce it."""

    name: str
    """Registry key, the value of --task."""
    fn: Callable[..., np.ndarray] | None
    """``fn(image, **params) -> target``; None when targets come from files ('pairs')."""
    defaults: Mapping[str, Any]
    """Every parameter of ``fn`` with its default; JSON-serialisable scalars only."""
    binary: bool
    """True when targets are {0, 1} (canny, otsu)."""
    description: str
    """One line for --help."""
    from_files: bool = False
    """True only for 'pairs': the data layer reads targets from a folder."""
    rules: Mapping[str, Rule] = field(default_factory=dict, compare=False)
    """Constraints checked by :func:`resolve_params`, keyed by parameter name."""

    @property
    def default_loss(self) -> str:
        """The training loss used when --loss is not given.

        Continuous targets (sobel, pairs): MAE. Sparse binary targets (canny: ~10 % edge pixels):
        MAE's optimum is the median, 0, and the ReLU output dies (measured: F1 0.00 after 10 000
        steps); the soft F1 loss rewards unbounded outputs (MSE 20 after 3 000 steps); MSE trains
        stably (F1 0.51, MAE 0.13 after 3 000 steps on 128² crops). So binary tasks use MSE.
        """
        return "mse" if self.binary else "mae"


TASKS: dict[str, Task] = {}


def register(name: str, *, defaults: Mapping[str, Any], binary: bool, description: str,
             rules: Mapping[str, Rule] | None = None) -> Callable[[Callable], Callable]:
    """Decorator adding ``fn`` to :data:`TASKS` under ``name``; returns ``fn`` unchanged."""

    def decorator(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
        if name in TASKS:
            raise ValueError(f"task {name!r} is already registered")
        TASKS[name] = Task(name=name, fn=fn, defaults=dict(defaults), binary=binary,
                           description=description, rules=dict(rules or {}))
        return fn

    return decorator


def get_task(name: str) -> Task:
    """The registered task called ``name``; ConfigError naming --task otherwise."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        choices = ", ".join(sorted(TASKS))
        raise ConfigError(f"--task: unknown task {name!r}; choose from {choices}") from None


def parse_task_params(items: Sequence[str]) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` from the command line -> ``{KEY: VALUE}`` (values stay strings)."""
    params: dict[str, str] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--task-param: expected KEY=VALUE, got {item!r}")
        if key in params:
            raise ConfigError(f"--task-param: key {key!r} given twice "
                              f"({key}={params[key]} and {item})")
        params[key] = value.strip()
    return params


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NONE = ("none", "null", "")


def _coerce(task: Task, key: str, value: Any) -> Any:
    """``value`` converted to the type of ``task.defaults[key]``; a None default means an
    optional float. Strings (from the CLI) are parsed; other types must already fit."""
    default = task.defaults[key]

    def fail(kind: str) -> ConfigError:
        return ConfigError(f"--task-param {key}={value}: must be {kind} (task '{task.name}')")

    text = value.strip().lower() if isinstance(value, str) else None
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise fail("true or false")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if text is not None:
            try:
                return int(text)
            except ValueError:
                pass
        raise fail("an integer")
    if isinstance(default, float) or default is None:
        if default is None and (value is None or text in _NONE):
            return None
        if isinstance(value, bool):
            raise fail("a number")
        try:
            number = float(text if text is not None else value)
        except (TypeError, ValueError):
            raise fail("a number" + (" or none" if default is None else "")) from None
        if not math.isfinite(number):
            raise fail("a finite number")
        return number
    if isinstance(default, str):
        if not isinstance(value, str):
            raise fail("a string")
        return value.strip()
    raise TypeError(f"task {task.name!r}: parameter {key!r} has an unsupported default {default!r}")


def resolve_params(task: Task, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``task.defaults`` updated by ``overrides``, each coerced to its default's type and checked
    against ``task.rules``. Unknown keys and invalid values raise ConfigError naming
    --task-param."""
    unknown = sorted(set(overrides) - set(task.defaults))
    if unknown:
        valid = ", ".join(sorted(task.defaults)) or "none (this task takes no parameters)"
        raise ConfigError(f"--task-param: unknown key {unknown[0]!r} for task '{task.name}'; "
                          f"valid keys: {valid}")
    params = dict(task.defaults)
    for key, value in overrides.items():
        params[key] = _coerce(task, key, value)
    for key, rule in task.rules.items():
        if not rule.ok(params[key], params):
            raise ConfigError(f"--task-param {key}={params[key]}: {rule.text} (task '{task.name}')")
    return params


def make_target(task: Task, image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    """``task.fn(image, **params)`` as float32 in [0, 1]; ValueError for tasks whose targets come
    from files. Missing parameters take their defaults."""
    if task.from_files or task.fn is None:
        raise ValueError(f"task '{task.name}' reads its targets from files; it has no operator")
    if np.ndim(image) != 2:
        raise ValueError(f"task '{task.name}' needs a 2-D grayscale image, "
                         f"got shape {np.shape(image)}")
    target = task.fn(image, **{**task.defaults, **params})
    return np.clip(np.asarray(target, dtype=np.float32), 0.0, 1.0)


def _choice(options: Sequence[str]) -> Rule:
    return Rule(lambda value, params: value in options, f"must be one of {', '.join(options)}")


@register(
    "sobel",
    defaults={"mode": "reflect", "normalize": "none"},
    binary=False,
    description="Sobel gradient magnitude sqrt((gx²+gy²)/2), as skimage.filters.sobel",
    rules={"mode": _choice(BORDER_MODES), "normalize": _choice(SOBEL_NORMALIZE)},
)
def sobel(image: np.ndarray, *, mode: str = "reflect", normalize: str = "none") -> np.ndarray:
    """Continuous Sobel gradient magnitude, equal to ``skimage.filters.sobel(image, mode=mode)``.

    ``gy = SOBEL_ROWS ⋆ image`` and ``gx = SOBEL_COLS ⋆ image`` (⋆: correlation with
    ``scipy.ndimage.correlate``, border ``mode``, cval 0), kernels [1, 0, −1] ⊗ [1, 2, 1]/4, and
    ``magnitude = sqrt((gx² + gy²) / 2)`` computed in float64 (scikit-image ``filters/edges.py``;
    Sobel & Feldman 1968; Kroon 2009). Correlation instead of convolution only flips the signs of
    gx and gy, not the magnitude.

    Range: each kernel has positive taps summing to 1 and negative taps summing to −1, so for
    pixels (and the cval-0 padding) in [0, 1], |gx| ≤ 1·1 − 1·0 = 1 and likewise |gy| ≤ 1; hence
    magnitude ≤ sqrt((1 + 1)/2) = 1. (The tight maximum is sqrt(5/8) ≈ 0.79: |gx| = 1 fixes the
    left and right columns of the 3×3 window, which leaves |gy| ≤ 1/2.) ``normalize='none'``
    (default) therefore only clips out-of-range inputs. ``normalize='max'`` divides by the
    per-image maximum; an all-zero magnitude stays zero.

    Why no per-image normalisation by default: dividing by the image maximum makes every target
    pixel depend on the strongest edge anywhere in the image, which a fully convolutional network
    with a 13×13 receptive field cannot see; it also makes a crop's target depend on what lies
    outside the crop. The absolute magnitude is a local function of a 3×3 neighbourhood.
    """
    x = np.asarray(image, dtype=np.float64)
    gy = ndi.correlate(x, SOBEL_ROWS, mode=mode, cval=0.0)
    gx = ndi.correlate(x, SOBEL_COLS, mode=mode, cval=0.0)
    magnitude = np.sqrt((gx * gx + gy * gy) / 2.0)
    if normalize == "max":
        peak = magnitude.max()
        magnitude = magnitude / peak if peak > 0 else magnitude
    return np.clip(magnitude, 0.0, 1.0).astype(np.float32)


def canny_magnitude(image: np.ndarray, sigma: float = CANNY_SIGMA,
                    mode: str = CANNY_MODE) -> np.ndarray:
    """Gradient magnitude exactly as ``skimage.feature.canny`` computes it internally (float64).

    Replicates ``skimage/feature/_canny.py`` (0.26): Gaussian smoothing with
    ``scipy.ndimage.gaussian_filter(image, sigma, mode=mode, cval=0, truncate=4)``; for
    ``mode='constant'`` the result is divided by the same filter applied to an all-ones image
    plus machine epsilon (skimage's "bleed-over" correction); then ``hypot(ndi.sobel(s, axis=0),
    ndi.sobel(s, axis=1))`` with scipy's unnormalised Sobel and its default 'reflect' border.
    """
    x = np.asarray(image, dtype=np.float64)
    smoothed = ndi.gaussian_filter(x, sigma, mode=mode, cval=0.0, truncate=CANNY_TRUNCATE)
    if mode == "constant":
        ones = np.ones_like(x)
        smoothed /= ndi.gaussian_filter(ones, sigma, mode=mode, cval=0.0, truncate=CANNY_TRUNCATE) \
            + np.finfo(np.float64).eps
    gy = ndi.sobel(smoothed, axis=0)
    gx = ndi.sobel(smoothed, axis=1)
    return np.sqrt(gy * gy + gx * gx)


def matlab_canny_thresholds(normalized: np.ndarray, high_fraction: float = CANNY_HIGH_FRACTION,
                            low_ratio: float = CANNY_LOW_RATIO) -> tuple[float, float]:
    """MATLAB ``edge(I,'canny')`` automatic (low, high) thresholds on a magnitude in [0, 1].

    ``counts = imhist(mag, 64)``; ``high = find(cumsum(counts) > high_fraction·numel, 1) / 64``;
    ``low = low_ratio · high``. ``imhist`` on a double image puts bin centres at k/63, k = 0..63,
    so a value v falls in bin ``floor(63·v + 0.5)`` (0-based); ``find`` is 1-based, hence the +1.
    """
    bins = np.floor(np.clip(normalized, 0.0, 1.0) * (CANNY_HIST_BINS - 1) + 0.5).astype(np.int64)
    counts = np.bincount(bins.ravel(), minlength=CANNY_HIST_BINS)
    first = int(np.argmax(np.cumsum(counts) > high_fraction * normalized.size))
    high = (first + 1) / CANNY_HIST_BINS
    return low_ratio * high, high


def _low_ok(value: float | None, params: Mapping[str, Any]) -> bool:
    if value is None:
        return True
    high = params["high_threshold"]
    return high is not None and 0.0 <= value <= high


@register(
    "canny",
    defaults={"sigma": CANNY_SIGMA, "high_fraction": CANNY_HIGH_FRACTION,
              "low_ratio": CANNY_LOW_RATIO, "low_threshold": None, "high_threshold": None,
              "mode": CANNY_MODE},
    binary=True,
    description="binary Canny edges as MATLAB edge(I,'canny'): sigma √2, auto 70 %/0.4 thresholds",
    rules={
        "sigma": Rule(lambda v, p: 0.0 < v <= 64.0,
                      "must be > 0 and at most 64 (the Gaussian spans ±4σ pixels)"),
        "high_fraction": Rule(lambda v, p: 0.0 < v < 1.0, "must be between 0 and 1 (exclusive)"),
        "low_ratio": Rule(lambda v, p: 0.0 < v < 1.0, "must be between 0 and 1 (exclusive)"),
        "high_threshold": Rule(lambda v, p: v is None or 0.0 < v <= 1.0,
                               "must be none or in (0, 1] (a fraction of the maximum magnitude)"),
        "low_threshold": Rule(_low_ok,
                              "must be none, or in [0, high_threshold] with high_threshold set"),
        "mode": _choice(BORDER_MODES),
    },
)
def canny(image: np.ndarray, *, sigma: float = CANNY_SIGMA,
          high_fraction: float = CANNY_HIGH_FRACTION, low_ratio: float = CANNY_LOW_RATIO,
          low_threshold: float | None = None, high_threshold: float | None = None,
          mode: str = CANNY_MODE) -> np.ndarray:
    """Binary Canny edge map (float32 0/1) following MATLAB ``edge(I,'canny')``.

    Runs ``skimage.feature.canny(image, sigma, low·M, high·M, mode=mode)`` on the float64 image,
    where M is the maximum of :func:`canny_magnitude` (skimage's own magnitude) and (low, high) are
    thresholds on the normalised magnitude ``mag / M`` in [0, 1]:

    * both None (default): MATLAB's rule, :func:`matlab_canny_thresholds` with
      ``high_fraction`` (PercentOfPixelsNotEdges, 0.7) and ``low_ratio`` (ThresholdRatio, 0.4);
    * only ``high_threshold`` given: low = ``low_ratio``·high (MATLAB's scalar-threshold form);
    * both given: used as they are.

    Smoothing σ = √2 and the 'nearest' border (MATLAB's 'replicate') are MATLAB's; non-maximum
    suppression (bilinear) and 8-connected hysteresis are skimage's, which with this rule match
    a MATLAB port at F1 0.93–0.95 (REFERENCE.md). A constant image (M = 0) has no edges.
    Canny (1986), IEEE TPAMI 8:679–714.
    """
    x = np.asarray(image, dtype=np.float64)
    magnitude = canny_magnitude(x, sigma, mode)
    peak = float(magnitude.max())
    if not peak > 0.0:
        return np.zeros(x.shape, dtype=np.float32)
    if high_threshold is None:
        low, high = matlab_canny_thresholds(magnitude / peak, high_fraction, low_ratio)
    else:
        high = high_threshold
        low = low_ratio * high if low_threshold is None else low_threshold
    edges = skimage.feature.canny(x, sigma=sigma, low_threshold=low * peak,
                                  high_threshold=high * peak, mode=mode)
    return edges.astype(np.float32)


@register(
    "otsu",
    defaults={"nbins": OTSU_NBINS},
    binary=True,
    description="binary Otsu threshold: image > skimage.filters.threshold_otsu(image)",
    rules={"nbins": Rule(lambda v, p: 2 <= v <= 65536, "must be an integer from 2 to 65536")},
)
def otsu(image: np.ndarray, *, nbins: int = OTSU_NBINS) -> np.ndarray:
    """``image > threshold_otsu(image, nbins)`` as float32 0/1 (Otsu 1979, IEEE TSMC 9:62–66).

    The threshold maximises the between-class variance of an ``nbins``-bin histogram over the
    image's own [min, max]. skimage returns the pixel value for a constant image, so a constant
    image gives all zeros.
    """
    x = np.asarray(image)
    threshold = skimage.filters.threshold_otsu(x, nbins=nbins)
    return (x > threshold).astype(np.float32)


TASKS["pairs"] = Task(
    name="pairs",
    fn=None,
    defaults={},
    binary=False,
    description="targets read from image files whose names match the inputs' (--targets)",
    from_files=True,
)
