"""Tests of the target operators and the task registry."""

import itertools
import json
import math

import numpy as np
import pytest
import skimage.data
import skimage.feature
import skimage.filters
from scipy import ndimage as ndi

from selfscale import tasks
from selfscale.errors import ConfigError
from selfscale.tasks import (
    TASKS,
    canny,
    canny_magnitude,
    get_task,
    make_target,
    otsu,
    parse_task_params,
    register,
    resolve_params,
    sobel,
)

OPERATORS = ("sobel", "canny", "otsu")


@pytest.fixture(scope="module")
def camera() -> np.ndarray:
    """skimage's camera subsampled to 256×256 (every second pixel), float32 in [0, 1]."""
    return (skimage.data.camera()[::2, ::2] / 255.0).astype(np.float32)


@pytest.fixture(scope="module")
def noise() -> np.ndarray:
    """A seeded 40×50 uniform random image, float32 in [0, 1]."""
    return np.random.default_rng(0).random((40, 50)).astype(np.float32)


# ---------------------------------------------------------------- known values on tiny images


def test_sobel_vertical_step_known_values():
    """A 5×5 vertical step 0|1 between columns 1 and 2 has magnitude √(1/2) on columns 1 and 2."""
    image = np.zeros((5, 5), np.float32)
    image[:, 2:] = 1.0
    # Rows are identical, so gy = 0 and gx = x[j-1] - x[j+1] (row weights 1/4+2/4+1/4 = 1):
    # col 0: x[-1]=x[0]=0 (reflect) - x[1]=0 -> 0;  col 1: 0 - 1 = -1;  col 2: 0 - 1 = -1;
    # col 3: 1 - 1 = 0;  col 4: 1 - x[5]=x[4]=1 -> 0.  Magnitude sqrt((gx² + 0)/2) = sqrt(1/2).
    expected = np.zeros((5, 5))
    expected[:, 1:3] = math.sqrt(0.5)
    np.testing.assert_allclose(sobel(image), expected, atol=1e-7)


def test_sobel_single_bright_pixel_known_values():
    """A single 1 in the middle of a 5×5 zero image gives 0.25 diagonally and √0.125 beside it."""
    image = np.zeros((5, 5), np.float32)
    image[2, 2] = 1.0
    # At (2,1): gx = (2/4)·(x[2,0] - x[2,2]) = -0.5, gy = (x[1,·] - x[3,·]) weighted = 0
    #           -> sqrt(0.25/2) = sqrt(0.125) ≈ 0.35355.
    # At (1,1): gx = (1/4)·(x[2,0] - x[2,2]) = -0.25, gy = (1/4)·(x[0,2] - x[2,2]) = -0.25
    #           -> sqrt((0.0625 + 0.0625)/2) = 0.25.
    # At (2,2): both differences are 0 - 0 = 0.  Rows/columns 0 and 4 are out of the 3×3 reach.
    side, diag = math.sqrt(0.125), 0.25
    expected = np.array([
        [0, 0, 0, 0, 0],
        [0, diag, side, diag, 0],
        [0, side, 0, side, 0],
        [0, diag, side, diag, 0],
        [0, 0, 0, 0, 0],
    ])
    np.testing.assert_allclose(sobel(image), expected, atol=1e-7)


def test_sobel_tight_maximum_over_binary_patches():
    """Over all 512 binary 3×3 patches the centre magnitude peaks at √(5/8), below the bound 1."""
    best = max(sobel(np.array(bits, np.float32).reshape(3, 3))[1, 1]
               for bits in itertools.product((0.0, 1.0), repeat=9))
    assert best == pytest.approx(math.sqrt(5 / 8), abs=1e-6)


def test_sobel_normalize_max_scales_peak_to_one(noise):
    """normalize='max' divides by the image maximum, so the peak is exactly 1."""
    out = sobel(noise, normalize="max")
    assert out.max() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(out, sobel(noise) / sobel(noise).max(), atol=1e-6)


def test_canny_ramp_edge_is_one_column():
    """A 32×32 step with a half-grey column 16 gives one edge column (16), border rows excluded."""
    image = np.zeros((32, 32), np.float32)
    image[:, 16] = 0.5
    image[:, 17:] = 1.0
    edges = np.argwhere(canny(image))
    assert set(edges[:, 1]) == {16}
    assert sorted(edges[:, 0]) == list(range(1, 31))


def test_otsu_two_levels():
    """An image of 0.2 and 0.8 halves thresholds to exactly the 0.8 half."""
    image = np.full((8, 8), 0.2, np.float32)
    image[:, 4:] = 0.8
    expected = np.zeros((8, 8), np.float32)
    expected[:, 4:] = 1.0
    np.testing.assert_array_equal(otsu(image), expected)


def test_matlab_thresholds_known_histogram():
    """80 zeros and 20 ones: bin 1 already holds 80 % > 70 %, so high = 1/64, low = 0.4/64."""
    magnitude = np.zeros(100)
    magnitude[:20] = 1.0
    low, high = tasks.matlab_canny_thresholds(magnitude)
    assert high == pytest.approx(1 / 64)
    assert low == pytest.approx(0.4 / 64)


def test_matlab_thresholds_use_imhist_centred_bins():
    """imhist centres bins at k/63: 0.5/63 - tiny is bin 1, 0.5/63 is bin 2 (1-based)."""
    below = np.full(10, 0.5 / 63 - 1e-9)
    above = np.full(10, 0.5 / 63)
    assert tasks.matlab_canny_thresholds(below)[1] == pytest.approx(1 / 64)
    assert tasks.matlab_canny_thresholds(above)[1] == pytest.approx(2 / 64)


# ---------------------------------------------------------------- equivalence with references


@pytest.mark.parametrize("mode", tasks.BORDER_MODES)
def test_sobel_equals_skimage_on_noise(noise, mode):
    """sobel equals skimage.filters.sobel for every border mode on a random image."""
    expected = skimage.filters.sobel(noise.astype(np.float64), mode=mode)
    np.testing.assert_allclose(sobel(noise, mode=mode), expected, atol=1e-6)


def test_sobel_equals_skimage_on_camera(camera):
    """sobel equals skimage.filters.sobel on the camera image."""
    expected = skimage.filters.sobel(camera.astype(np.float64))
    np.testing.assert_allclose(sobel(camera), expected, atol=1e-6)


def _reference_canny_magnitude(image: np.ndarray, sigma: float, mode: str) -> np.ndarray:
    """Gaussian smoothing through skimage's public filter, then scipy's Sobel."""
    smoothed = skimage.filters.gaussian(image.astype(np.float64), sigma=sigma, mode=mode,
                                        preserve_range=True)
    return np.hypot(ndi.sobel(smoothed, axis=0), ndi.sobel(smoothed, axis=1))


def test_canny_magnitude_equals_skimage_gaussian_plus_sobel(camera):
    """canny_magnitude equals skimage's public gaussian followed by scipy's sobel."""
    expected = _reference_canny_magnitude(camera, math.sqrt(2), "nearest")
    np.testing.assert_allclose(canny_magnitude(camera), expected, rtol=1e-12, atol=1e-12)


def test_canny_magnitude_constant_mode_matches_skimage_preprocess(noise):
    """For mode='constant' the bleed-over correction matches skimage's private _preprocess."""
    from skimage.feature._canny import _preprocess  # pinned here only; tasks.py does not import it

    smoothed, _ = _preprocess(noise.astype(np.float64), None, math.sqrt(2), "constant", 0.0)
    expected = np.hypot(ndi.sobel(smoothed, axis=0), ndi.sobel(smoothed, axis=1))
    np.testing.assert_allclose(canny_magnitude(noise, mode="constant"), expected,
                               rtol=1e-12, atol=1e-12)


def _reference_matlab_canny(image: np.ndarray) -> np.ndarray:
    """MATLAB's threshold rule written independently: np.histogram with imhist's centred edges."""
    sigma = math.sqrt(2)
    magnitude = _reference_canny_magnitude(image, sigma, "nearest")
    peak = magnitude.max()
    edges = (np.arange(65) - 0.5) / 63  # imhist(I, 64) on doubles: bin centres 0, 1/63, ..., 1
    counts, _ = np.histogram(magnitude / peak, bins=edges)
    first = int(np.searchsorted(np.cumsum(counts), 0.7 * magnitude.size, side="right"))
    high = (first + 1) / 64
    low = 0.4 * high
    return skimage.feature.canny(image.astype(np.float64), sigma=sigma, low_threshold=low * peak,
                                 high_threshold=high * peak, mode="nearest")


def test_canny_equals_independent_matlab_rule(camera):
    """canny on camera 256×256 equals skimage canny with independently computed MATLAB rule."""
    expected = _reference_matlab_canny(camera)
    np.testing.assert_array_equal(canny(camera), expected.astype(np.float32))
    assert 0.02 < expected.mean() < 0.3


def test_canny_explicit_high_threshold_uses_low_ratio(camera):
    """Only high_threshold given: low = low_ratio·high, both relative to the image maximum."""
    peak = canny_magnitude(camera).max()
    expected = skimage.feature.canny(camera.astype(np.float64), sigma=math.sqrt(2),
                                     low_threshold=0.5 * 0.2 * peak, high_threshold=0.2 * peak,
                                     mode="nearest")
    out = canny(camera, high_threshold=0.2, low_ratio=0.5)
    np.testing.assert_array_equal(out, expected.astype(np.float32))


def test_otsu_equals_skimage(camera, noise):
    """otsu equals image > skimage.filters.threshold_otsu(image, nbins)."""
    for image, nbins in ((camera, 256), (noise, 32)):
        expected = image > skimage.filters.threshold_otsu(image, nbins=nbins)
        np.testing.assert_array_equal(otsu(image, nbins=nbins), expected.astype(np.float32))


# ---------------------------------------------------------------- range, dtype, constant images


@pytest.mark.parametrize("name", OPERATORS)
def test_operator_range_dtype_shape(name, camera, noise):
    """Every operator returns float32 of the input's shape in [0, 1]; binary ones only {0, 1}."""
    task = get_task(name)
    for image in (camera, noise):
        out = make_target(task, image, resolve_params(task, {}))
        assert out.dtype == np.float32
        assert out.shape == image.shape
        assert out.min() >= 0.0 and out.max() <= 1.0
        if task.binary:
            assert set(np.unique(out)) <= {0.0, 1.0}


@pytest.mark.parametrize("name", OPERATORS)
@pytest.mark.parametrize("value", (0.0, 0.37, 1.0))
def test_operator_constant_image_is_all_zero(name, value):
    """A constant image has no edges and nothing above its Otsu threshold: all zeros, no error."""
    task = get_task(name)
    out = make_target(task, np.full((16, 16), value, np.float32), resolve_params(task, {}))
    assert out.dtype == np.float32
    assert not out.any()


def test_sobel_max_normalize_constant_image_stays_zero():
    """normalize='max' on a constant image does not divide by zero."""
    assert not sobel(np.full((6, 6), 0.5, np.float32), normalize="max").any()


# ---------------------------------------------------------------- registry and parameters


def test_registry_names_and_flags():
    """The four tasks are registered with the documented flags."""
    assert sorted(TASKS) == ["canny", "otsu", "pairs", "sobel"]
    assert get_task("canny").binary and get_task("otsu").binary
    assert not get_task("sobel").binary
    pairs = get_task("pairs")
    assert pairs.fn is None and pairs.from_files and not pairs.binary and dict(pairs.defaults) == {}


def test_defaults_are_json_scalars():
    """Every default is a JSON-serialisable scalar, and canny's sigma defaults to √2."""
    for task in TASKS.values():
        json.dumps(dict(task.defaults))
        assert all(v is None or isinstance(v, (bool, int, float, str))
                   for v in task.defaults.values())
    assert get_task("canny").defaults["sigma"] == math.sqrt(2)


def test_register_adds_operator(monkeypatch):
    """register adds a one-function operator to TASKS; a second registration of the name fails."""
    monkeypatch.setattr(tasks, "TASKS", {})

    @register("invert", defaults={"gain": 1.0}, binary=False, description="1 - image")
    def invert(image, *, gain=1.0):
        return gain * (1.0 - image)

    task = tasks.get_task("invert")
    assert task.fn is invert and task.defaults == {"gain": 1.0}
    np.testing.assert_allclose(make_target(task, np.zeros((2, 2)), {}), np.ones((2, 2)))
    with pytest.raises(ValueError, match="already registered"):
        register("invert", defaults={}, binary=False, description="again")(invert)


def test_resolve_params_coerces_strings():
    """CLI strings are coerced to the type of the default."""
    canny_params = resolve_params(get_task("canny"),
                                  {"sigma": "1.5", "mode": "reflect", "high_threshold": "0.3"})
    assert canny_params["sigma"] == 1.5 and canny_params["mode"] == "reflect"
    assert canny_params["high_threshold"] == 0.3 and canny_params["low_threshold"] is None
    assert resolve_params(get_task("canny"), {"high_threshold": "none"})["high_threshold"] is None
    assert resolve_params(get_task("canny"), {"sigma": 2})["sigma"] == 2.0
    assert isinstance(resolve_params(get_task("canny"), {"sigma": 2})["sigma"], float)
    assert resolve_params(get_task("otsu"), {"nbins": "64"}) == {"nbins": 64}
    assert resolve_params(get_task("sobel"), {"normalize": "max"}) == {"mode": "reflect",
                                                                      "normalize": "max"}


def test_resolve_params_does_not_mutate_defaults():
    """Overrides never leak into the registered defaults."""
    task = get_task("sobel")
    resolve_params(task, {"mode": "wrap"})
    assert task.defaults["mode"] == "reflect"


def test_parse_task_params():
    """KEY=VALUE strings become a dict of strings; '=' inside the value is kept."""
    assert parse_task_params(["sigma=2", " mode = nearest ", "x=a=b"]) == {
        "sigma": "2", "mode": "nearest", "x": "a=b"}
    assert parse_task_params([]) == {}


def test_make_target_rejects_pairs_and_3d():
    """make_target raises ValueError for file-based tasks and for non-2-D images."""
    with pytest.raises(ValueError, match="pairs"):
        make_target(get_task("pairs"), np.zeros((4, 4)), {})
    with pytest.raises(ValueError, match="2-D"):
        make_target(get_task("sobel"), np.zeros((4, 4, 3)), {})


# ---------------------------------------------------------------- error messages


def test_unknown_task_message():
    """An unknown task names --task, the value and every valid task."""
    with pytest.raises(ConfigError) as info:
        get_task("x")
    assert str(info.value) == "--task: unknown task 'x'; choose from canny, otsu, pairs, sobel"


def test_unknown_param_lists_valid_keys():
    """An unknown parameter names --task-param, the key and the valid keys."""
    with pytest.raises(ConfigError, match=r"--task-param.*'sgima'.*valid keys: mode, normalize"):
        resolve_params(get_task("sobel"), {"sgima": "1"})
    with pytest.raises(ConfigError, match=r"--task-param.*'k'.*takes no parameters"):
        resolve_params(get_task("pairs"), {"k": "1"})


@pytest.mark.parametrize(("name", "key", "value", "rule"), [
    ("canny", "sigma", "-1", "> 0"),
    ("canny", "sigma", "0", "> 0"),
    ("canny", "sigma", "abc", "a number"),
    ("canny", "sigma", "nan", "finite"),
    ("canny", "sigma", True, "a number"),
    ("canny", "mode", "edge", "one of reflect, nearest"),
    ("canny", "high_fraction", "1", "between 0 and 1"),
    ("canny", "low_ratio", "0", "between 0 and 1"),
    ("canny", "high_threshold", "1.5", "(0, 1]"),
    ("canny", "low_threshold", "0.1", "high_threshold"),
    ("sobel", "mode", "bogus", "one of reflect"),
    ("sobel", "normalize", "minmax", "one of none, max"),
    ("otsu", "nbins", "1", "from 2 to 65536"),
    ("otsu", "nbins", "2.5", "an integer"),
])
def test_bad_param_value_message(name, key, value, rule):
    """A bad value names --task-param KEY=VALUE and the rule broken."""
    with pytest.raises(ConfigError) as info:
        resolve_params(get_task(name), {key: value})
    message = str(info.value)
    assert message.startswith(f"--task-param {key}=")
    assert rule in message
    assert "\n" not in message


def test_low_threshold_above_high_rejected():
    """low_threshold above high_threshold is a --task-param error."""
    with pytest.raises(ConfigError, match="low_threshold=0.5"):
        resolve_params(get_task("canny"), {"low_threshold": "0.5", "high_threshold": "0.4"})


@pytest.mark.parametrize("item", ["sigma", "=1", " =1"])
def test_parse_task_params_malformed(item):
    """A malformed item names --task-param and echoes the item."""
    with pytest.raises(ConfigError, match=r"^--task-param: expected KEY=VALUE"):
        parse_task_params([item])


def test_parse_task_params_duplicate_key():
    """The same key twice is an error, not a silent override."""
    with pytest.raises(ConfigError, match="--task-param: key 'sigma' given twice"):
        parse_task_params(["sigma=1", "sigma=2"])
