"""benchmarks/sobel_constructions.py: the hand-built networks compute what they claim."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch


@pytest.fixture(scope="module")
def cons(load_benchmark):
    return load_benchmark("sobel_constructions")


def test_alpha_max_beta_min_fit_matches_theory(cons):
    # u + v, |u − v| span alpha·max + beta·min; the best uniform fit of the circle by
    # alpha·max + beta·min has a max relative error of a few per cent
    c, err = cons.fit_layer3(cons.layer2_rows("amb"))
    assert 0.03 < err < 0.06
    assert c[1] == pytest.approx(c[2], rel=1e-6)  # symmetric in u and v
    # u + v runs over [1, √2] on the circle, so no scale does better than the minimax
    # (√2 − 1)/(√2 + 1); the least-squares fit is a little worse
    _, err_l1 = cons.fit_layer3(cons.layer2_rows("l1"))
    assert (math.sqrt(2) - 1) / (math.sqrt(2) + 1) <= err_l1 < 0.25
    _, err_five = cons.fit_layer3(cons.layer2_rows("five", (0.3, 0.75)))
    assert err_five < 0.02 < err


@pytest.mark.parametrize("name,t", [("l1", ()), ("amb", ()), ("five", (0.3, 0.75))])
def test_construction_computes_the_sobel_magnitude_within_its_fit(cons, name, t):
    rows = cons.layer2_rows(name, t)
    c, err = cons.fit_layer3(rows)
    model = cons.construct(rows, c)
    img = np.random.default_rng(3).random((24, 24)).astype(np.float32)
    with torch.no_grad():
        out = model(torch.from_numpy(img)[None, None])[0, 0].double().numpy()
    gx = ndi.correlate(img.astype(np.float64), cons.GX, mode="constant")
    gy = ndi.correlate(img.astype(np.float64), cons.GY, mode="constant")
    exact = np.sqrt((gx ** 2 + gy ** 2) / 2)
    rel = np.abs(out - exact) / np.maximum(exact, 1e-9)
    assert rel.max() <= err + 1e-5  # homogeneous of degree 1: the circle's bound holds everywhere
    assert rel.max() > 0.5 * err    # and the random image comes near it
