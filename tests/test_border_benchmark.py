"""benchmarks/border_bound.py: the context evaluation equals a whole-image prediction, cropped."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfscale.data import ImageSet
from selfscale.metrics import METRICS
from selfscale.model import build_model


@pytest.fixture(scope="module")
def border(load_benchmark):
    return load_benchmark("border_bound")


def _images(rng: np.random.Generator) -> ImageSet:
    shapes = [(40, 44), (37, 37), (50, 41)]
    inputs = [rng.random(s, dtype=np.float32) for s in shapes]
    targets = [rng.random(s, dtype=np.float32) for s in shapes]
    return ImageSet([f"i{k}" for k in range(3)], inputs, targets)


def test_context_scores_equal_whole_image_prediction_cropped(border):
    model = build_model((3, 2, 1), 5, 1, 0.3, 0)
    images = _images(np.random.default_rng(1))
    crop = 24
    got = border.scores_with_context(model, images, crop)
    f1 = []
    with torch.no_grad():
        for x, y in zip(images.inputs, images.targets):
            h, w = x.shape
            top, left = (h - crop) // 2, (w - crop) // 2
            out = model(torch.from_numpy(x)[None, None])[..., top:top + crop, left:left + crop]
            f1.append(float(METRICS["f1"].fn(out, torch.from_numpy(y[top:top + crop, left:left + crop])[None, None])))
    assert got["f1"] == pytest.approx(np.mean(f1), abs=1e-6)
    # and it differs from scoring the zero-padded crop (the network reads past the crop edge)
    x = torch.from_numpy(np.stack([a[(a.shape[0] - crop) // 2:, (a.shape[1] - crop) // 2:][:crop, :crop]
                                   for a in images.inputs]))[:, None]
    y = torch.from_numpy(np.stack([a[(a.shape[0] - crop) // 2:, (a.shape[1] - crop) // 2:][:crop, :crop]
                                   for a in images.targets]))[:, None]
    with torch.no_grad():
        padded = float(METRICS["f1"].fn(model(x), y).mean())
    assert abs(padded - got["f1"]) > 1e-4


def test_exact_sobel_bound_is_one_inside_the_border(border):
    img = np.random.default_rng(2).random((1, 1, 16, 16)).astype(np.float32)
    k = np.outer([1, 2, 1], [1, 0, -1]) / 4
    import scipy.ndimage as ndi
    gx = ndi.correlate(img[0, 0], k, mode="constant")
    gy = ndi.correlate(img[0, 0], k.T, mode="constant")
    target = np.sqrt((gx ** 2 + gy ** 2) / 2).astype(np.float32)[None, None]
    whole, inner = border.exact_sobel_bound(img, target)
    assert whole == pytest.approx(1.0, abs=1e-6)
    assert inner == pytest.approx(1.0, abs=1e-6)
