"""Tests of the losses and metrics: soft F1, MAE, MSE and UIQI."""

import math

import numpy as np
import pytest
import skimage.data
import torch

from selfscale.metrics import (
    LOSSES,
    METRICS,
    evaluate_metrics,
    f1_loss,
    f1_score,
    mae,
    mse,
    uiqi,
    uiqi_map,
)
from selfscale.tasks import canny, sobel


def _slow_uiqi(x: np.ndarray, y: np.ndarray, block: int = 8) -> float:
    """img_qi.m window by window in the paper's notation (means, unbiased variances)."""
    rows, cols = x.shape[0] - block + 1, x.shape[1] - block + 1
    quality = np.ones((rows, cols))
    for i in range(rows):
        for j in range(cols):
            a = x[i:i + block, j:j + block].ravel()
            b = y[i:i + block, j:j + block].ravel()
            ma, mb = a.mean(), b.mean()
            va, vb = a.var(ddof=1), b.var(ddof=1)
            cov = ((a - ma) * (b - mb)).sum() / (a.size - 1)
            spread, level = va + vb, ma * ma + mb * mb
            if spread == 0 and level != 0:
                quality[i, j] = 2 * ma * mb / level
            elif spread * level != 0:
                quality[i, j] = 4 * cov * ma * mb / (spread * level)
    return float(quality.mean())


@pytest.fixture(scope="module")
def camera() -> np.ndarray:
    """skimage's camera subsampled to 256×256 (every second pixel), float64 in [0, 1]."""
    return skimage.data.camera()[::2, ::2] / 255.0


def _batch(*images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(images))[:, None].double()


# ---------------------------------------------------------------- F1


def test_f1_hand_values():
    """pred [1, .5, 0] vs target [1, 1, 0]: TP = 1.5, E = 0.5, F1 = 3 / 3.5."""
    pred = torch.tensor([[[1.0, 0.5, 0.0]]])
    target = torch.tensor([[[1.0, 1.0, 0.0]]])
    assert f1_score(pred, target).item() == pytest.approx(3 / 3.5)
    assert f1_loss(pred, target).item() == pytest.approx(0.5 / 3.5)


def test_f1_binary_equals_classic_f1():
    """On binary maps soft F1 is 2TP / (2TP + FP + FN)."""
    rng = np.random.default_rng(1)
    pred = torch.from_numpy(rng.random((2, 1, 9, 9)) > 0.5).float()
    target = torch.from_numpy(rng.random((2, 1, 9, 9)) > 0.6).float()
    tp = (pred * target).sum(dim=(1, 2, 3))
    fp = (pred * (1 - target)).sum(dim=(1, 2, 3))
    fn = ((1 - pred) * target).sum(dim=(1, 2, 3))
    torch.testing.assert_close(f1_score(pred, target), 2 * tp / (2 * tp + fp + fn))


def test_f1_identical_and_all_zero():
    """Identical non-zero images score 1; two all-zero images score 1 with loss 0."""
    image = torch.rand(2, 1, 6, 6) + 0.1
    torch.testing.assert_close(f1_score(image, image), torch.ones(2))
    zeros = torch.zeros(3, 1, 4, 4)
    torch.testing.assert_close(f1_score(zeros, zeros), torch.ones(3))
    assert f1_loss(zeros, zeros).item() == 0.0


def test_f1_loss_is_one_minus_mean_f1():
    """Where every denominator is positive, f1_loss = 1 - mean F1."""
    pred, target = torch.rand(4, 1, 7, 7), torch.rand(4, 1, 7, 7)
    assert f1_loss(pred, target).item() == pytest.approx(1 - f1_score(pred, target).mean().item())


def test_f1_loss_mixed_batch_zero_denominator_contributes_zero():
    """An all-zero pair contributes 0 to the batch mean of the loss."""
    pred = torch.tensor([[[1.0, 0.5, 0.0]], [[0.0, 0.0, 0.0]]])
    target = torch.tensor([[[1.0, 1.0, 0.0]], [[0.0, 0.0, 0.0]]])
    assert f1_loss(pred, target).item() == pytest.approx((0.5 / 3.5 + 0.0) / 2)


@pytest.mark.parametrize("target_value", (0.0, 1.0))
def test_f1_loss_gradient_finite_on_all_zero(target_value):
    """Backprop through f1_loss gives finite gradients for all-zero predictions."""
    pred = torch.zeros(2, 1, 5, 5, requires_grad=True)
    target = torch.full((2, 1, 5, 5), target_value)
    f1_loss(pred, target).backward()
    assert torch.isfinite(pred.grad).all()


def test_f1_no_clipping_of_unbounded_outputs():
    """Values above 1 (ReLU outputs) are used as they are: pred 2 vs target 1 -> 4 / (4 + 1)."""
    assert f1_score(torch.tensor([[[2.0]]]), torch.tensor([[[1.0]]])).item() == pytest.approx(0.8)


# ---------------------------------------------------------------- MAE, MSE, losses


def test_mae_mse_hand_values():
    """pred [[0,1],[2,3]] vs zeros: MAE = 6/4 = 1.5, MSE = 14/4 = 3.5; second image equal: 0."""
    pred = torch.tensor([[[0.0, 1.0], [2.0, 3.0]], [[1.0, 1.0], [1.0, 1.0]]])
    target = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]])
    torch.testing.assert_close(mae(pred, target), torch.tensor([1.5, 0.0]))
    torch.testing.assert_close(mse(pred, target), torch.tensor([3.5, 0.0]))
    assert LOSSES["mae"](pred, target).item() == pytest.approx(0.75)
    assert LOSSES["mse"](pred, target).item() == pytest.approx(1.75)


@pytest.mark.parametrize("shape", [(3, 1, 8, 9), (3, 8, 9)])
def test_per_image_shapes(shape):
    """Per-image metrics return (N,) for (N,1,H,W) and (N,H,W) inputs; uiqi in float64."""
    pred, target = torch.rand(shape), torch.rand(shape)
    for metric in METRICS.values():
        assert metric.fn(pred, target).shape == (3,)
    assert uiqi(pred, target).dtype == torch.float64


@pytest.mark.parametrize("name", ["mae", "mse", "f1"])
def test_losses_are_scalar_and_differentiable(name):
    """Every loss returns a scalar that backpropagates to finite gradients."""
    pred = torch.rand(3, 1, 6, 6, requires_grad=True)
    loss = LOSSES[name](pred, torch.rand(3, 1, 6, 6))
    assert loss.shape == ()
    loss.backward()
    assert torch.isfinite(pred.grad).all()


def test_metric_registry():
    """METRICS holds f1, mae, mse, uiqi with the right direction of improvement."""
    assert sorted(METRICS) == ["f1", "mae", "mse", "uiqi"]
    assert {name: m.higher_is_better for name, m in METRICS.items()} == {
        "f1": True, "mae": False, "mse": False, "uiqi": True}
    assert all(m.name == name for name, m in METRICS.items())
    assert sorted(LOSSES) == ["f1", "mae", "mse"]


def test_evaluate_metrics_returns_python_floats():
    """evaluate_metrics gives the batch mean of each metric as a python float."""
    pred, target = torch.rand(2, 1, 10, 10), torch.rand(2, 1, 10, 10)
    result = evaluate_metrics(pred, target)
    assert list(result) == ["f1", "mae", "mse", "uiqi"]
    assert all(type(v) is float for v in result.values())
    assert result["mae"] == pytest.approx(mae(pred, target).mean().item())
    assert evaluate_metrics(pred, target, names=("mse",)).keys() == {"mse"}


# ---------------------------------------------------------------- UIQI


@pytest.mark.parametrize("shape", [(8, 8), (9, 13), (20, 17)])
def test_uiqi_equals_slow_reference(shape):
    """Vectorised uiqi equals a window-by-window loop of img_qi.m to 1e-12."""
    rng = np.random.default_rng(sum(shape))
    x, y, z = rng.random(shape), rng.random(shape), rng.random(shape)
    y = 0.5 * x + 0.5 * y  # correlated pair, plus an unrelated one
    got = uiqi(_batch(x, x), _batch(y, z)).numpy()
    np.testing.assert_allclose(got, [_slow_uiqi(x, y), _slow_uiqi(x, z)], rtol=0, atol=1e-12)


def test_uiqi_map_shape():
    """The map is (H-7)×(W-7): the 8×8 window slides by one pixel."""
    assert uiqi_map(torch.rand(2, 1, 20, 17), torch.rand(2, 1, 20, 17)).shape == (2, 13, 10)


def test_uiqi_zero_windows_score_one():
    """Two all-zero images score 1 (the map starts at 1)."""
    zeros = torch.zeros(1, 1, 8, 8)
    assert uiqi(zeros, zeros).item() == 1.0


def test_uiqi_zero_against_nonconstant_scores_zero():
    """An all-zero window against a non-constant one scores 0."""
    zeros = torch.zeros(1, 1, 8, 8)
    other = torch.rand(1, 1, 8, 8)
    assert uiqi(zeros, other).item() == 0.0
    assert uiqi(other, zeros).item() == 0.0


def test_uiqi_constant_windows_rule():
    """Constant windows 0.5 vs 0.25 score 2x̄ȳ/(x̄²+ȳ²) = 0.25/0.3125 = 0.8."""
    x, y = torch.full((1, 1, 8, 8), 0.5), torch.full((1, 1, 8, 8), 0.25)
    assert uiqi(x, y).item() == pytest.approx(0.8, abs=1e-15)
    assert uiqi(x, torch.zeros_like(x)).item() == 0.0


def test_uiqi_identical_and_scaled():
    """Q(x, x) = 1; Q(x, 0.8x) = 4·0.64 / 1.64² ≈ 0.95181 on every non-constant window."""
    x = torch.rand(2, 1, 12, 12, dtype=torch.float64) + 0.05
    torch.testing.assert_close(uiqi(x, x), torch.ones(2, dtype=torch.float64))
    expected = 4 * 0.64 / 1.64**2
    torch.testing.assert_close(uiqi(x, 0.8 * x), torch.full((2,), expected, dtype=torch.float64))


def test_uiqi_symmetric():
    """UIQI is symmetric in its arguments."""
    x, y = torch.rand(2, 1, 11, 10), torch.rand(2, 1, 11, 10)
    torch.testing.assert_close(uiqi(x, y), uiqi(y, x), rtol=0, atol=1e-14)


def test_uiqi_reference_camera_noise(camera):
    """camera 256×256 vs camera + N(0, 0.05) clipped scores about 0.46 (REFERENCE.md)."""
    noisy = np.clip(camera + np.random.default_rng(0).normal(0.0, 0.05, camera.shape), 0, 1)
    assert uiqi(_batch(camera), _batch(noisy)).item() == pytest.approx(0.46, abs=0.03)


def test_uiqi_reference_canny_self_and_scaled_sobel(camera):
    """A Canny map against itself scores 1.000; a Sobel map against 0.8× itself about 0.952."""
    edges = _batch(canny(camera).astype(np.float64))
    assert uiqi(edges, edges).item() == pytest.approx(1.0, abs=1e-9)
    magnitude = _batch(sobel(camera).astype(np.float64))
    assert uiqi(magnitude, 0.8 * magnitude).item() == pytest.approx(0.952, abs=0.005)


# ---------------------------------------------------------------- error messages


def test_shape_mismatch_names_both_shapes():
    """Different shapes raise ValueError naming both."""
    for fn in (f1_score, f1_loss, mae, mse, uiqi):
        with pytest.raises(ValueError, match=r"\(2, 1, 8, 8\).*\(2, 1, 8, 9\)"):
            fn(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 9))


def test_multichannel_rejected():
    """(N, C, H, W) with C > 1 is rejected with the shape in the message."""
    with pytest.raises(ValueError, match=r"\(1, 3, 8, 8\)"):
        mae(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_uiqi_too_small():
    """Images smaller than 8×8 raise ValueError naming the size."""
    with pytest.raises(ValueError, match="7×9"):
        uiqi(torch.zeros(1, 7, 9), torch.zeros(1, 7, 9))


def test_evaluate_metrics_unknown_name():
    """An unknown metric name lists the valid ones."""
    with pytest.raises(ValueError, match="'psnr'.*f1, mae, mse, uiqi"):
        evaluate_metrics(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8), names=("psnr",))


def test_uiqi_does_not_track_gradients():
    """uiqi is a metric: its result carries no autograd graph."""
    pred = torch.rand(1, 1, 8, 8, requires_grad=True)
    assert not uiqi(pred, torch.rand(1, 1, 8, 8)).requires_grad
    assert math.isfinite(uiqi(pred, pred).item())


def _uiqi_pairs():
    """float32 pairs: random, correlated, constant and zero windows, ReLU outputs against
    binary targets, odd sizes and non-contiguous layouts."""
    gen = torch.Generator().manual_seed(3)
    for shape in [(2, 1, 8, 8), (3, 1, 9, 30), (1, 1, 40, 37), (1, 1, 130, 100)]:
        x, y = torch.rand(shape, generator=gen), torch.rand(shape, generator=gen)
        yield x, y
        yield x, 0.5 * x + 0.5 * y
        flat_x, flat_y = x.clone(), y.clone()
        flat_x[..., :9, :12], flat_y[..., :9, :12] = 0.5, 0.25
        flat_x[..., -8:, -8:], flat_y[..., -8:, -8:] = 0.0, 0.0
        yield flat_x, flat_y
        yield (torch.relu(torch.randn(shape, generator=gen)) * 3,
               (torch.rand(shape, generator=gen) > 0.7).float())
        yield x.contiguous(memory_format=torch.channels_last), y.transpose(2, 3).contiguous() \
            .transpose(2, 3)
        if shape[-1] >= 20:
            yield x[..., 1:, 1::2], y[..., :-1, 1::2]


def test_uiqi_map_from_the_kernels_is_bit_identical_to_pytorch_s(monkeypatch):
    """With the direct kernels loaded the map comes from their C++ loop: the same operations in
    the same order, so the same float64 bits."""
    from selfscale import direct, metrics

    if direct.library() is None:
        pytest.skip(f"direct kernels not built: {direct.failure()}")
    for x, y in _uiqi_pairs():
        fast = uiqi_map(x, y)
        with monkeypatch.context() as m:
            m.setattr(direct, "_library", None)
            slow = uiqi_map(x, y)
        assert metrics._uiqi_map_kernel(x, y) is not None
        assert fast.dtype == slow.dtype == torch.float64 and torch.equal(fast, slow)
    assert metrics._uiqi_map_kernel(torch.rand(1, 1, 9, 9).double(), torch.rand(1, 1, 9, 9)) \
        is None  # float64 input: PyTorch's
