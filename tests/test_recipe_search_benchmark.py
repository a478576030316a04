"""benchmarks/recipe_search.py: the first-layer starts, the angular ripple, exact resume."""

from __future__ import annotations

import tomllib

import numpy as np
import pytest
import torch

from selfscale.run import load_run
from selfscale.tasks import sobel


@pytest.fixture(scope="module")
def rs(load_benchmark):
    return load_benchmark("recipe_search")


def _weight(seed: int = 0) -> torch.Tensor:
    return torch.randn(5, 1, 5, 5, generator=torch.Generator().manual_seed(seed))


def test_mirrored_start_makes_two_pairs_and_keeps_the_fifth_mask(rs):
    w = _weight()
    before = w.clone()
    rs.first_layer_start(w, "mirrored")
    assert torch.equal(w[1], -before[0]) and torch.equal(w[3], -before[2])
    assert torch.equal(w[0], before[0]) and torch.equal(w[2], before[2])
    assert torch.equal(w[4], before[4])


def test_zero_mean_start_removes_only_each_masks_mean(rs):
    w = _weight(1)
    before = w.clone()
    rs.first_layer_start(w, "zero-mean")
    assert torch.allclose(w.sum(dim=(1, 2, 3)), torch.zeros(5), atol=1e-5)
    shift = (before - w).flatten(1)
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-6)


def test_pca_pairs_start_equals_numpy_principal_components(rs):
    rng = np.random.default_rng(0)
    # patches with a dominant mean, then a horizontal, then a weaker vertical ramp
    ramp = np.linspace(-1, 1, 5)
    patches = (rng.normal(0, 3, (4000, 1, 1)) + rng.normal(0, 1, (4000, 1, 1)) * ramp[None, :]
               + rng.normal(0, 0.5, (4000, 1, 1)) * ramp[:, None] + rng.normal(0, 0.05, (4000, 5, 5)))
    w = _weight(2)
    norms = w.flatten(1).norm(dim=1)
    rs.first_layer_start(w, "pca-pairs", patches)
    values, vectors = np.linalg.eigh(np.cov(patches.reshape(-1, 25).T))
    pcs = vectors[:, np.argsort(values)[::-1]].T
    got = w[:, 0].reshape(5, 25).double().numpy()
    for i, pc in enumerate([1, 1, 2, 2, 0]):
        unit = got[i] / np.linalg.norm(got[i])
        assert abs(unit @ pcs[pc]) == pytest.approx(1.0, abs=1e-6)  # the same axis, up to sign
    unit = w.flatten(1) / w.flatten(1).norm(dim=1, keepdim=True)
    assert torch.allclose(unit[1], -unit[0]) and torch.allclose(unit[3], -unit[2])  # ± pairs
    assert torch.allclose(w.flatten(1).norm(dim=1), norms, rtol=1e-5)  # each at its drawn norm
    assert abs(got[0] @ pcs[1]) > 0.99 and abs(got[0] @ ramp.repeat(5)) > 0  # PC2: the strong ramp


def test_unknown_start_is_refused(rs):
    with pytest.raises(ValueError, match="unknown first-layer start"):
        rs.first_layer_start(_weight(), "pentagon")


def _rings(size: int = 96) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] - size / 2
    return (0.5 + 0.4 * np.sin(np.hypot(xx, yy) / 3.0)).astype(np.float32)


def test_angular_ripple_is_zero_for_the_exact_magnitude_and_large_for_the_l1_norm(rs):
    from scipy import ndimage

    from selfscale.tasks import SOBEL_COLS, SOBEL_ROWS

    image = _rings()
    target = sobel(image)
    x, y = image[None, None], target[None, None].astype(np.float32)
    assert rs.angular_ripple(y.copy(), x, y) == pytest.approx(0.0, abs=1e-6)
    gx = ndimage.correlate(image.astype(np.float64), SOBEL_COLS)
    gy = ndimage.correlate(image.astype(np.float64), SOBEL_ROWS)
    l1 = (np.abs(gx) + np.abs(gy))[None, None]
    # |gx|+|gy| over √((gx²+gy²)/2) runs from √2 (axes) to 2 (diagonals): a ripple of 0.2–0.35
    assert 0.2 < rs.angular_ripple(l1, x, y) < 0.35
    assert np.isnan(rs.angular_ripple(np.zeros_like(y), x, y))  # a dead output has no ratio


class Killed(Exception):
    pass


def test_a_job_killed_and_run_again_ends_as_an_uninterrupted_one(rs, tmp_path, monkeypatch):
    import selfscale.run as runmod
    from selfscale.train import TrainHooks

    whole = rs.run_job("l1-mirrored", 3, 6, 3, str(tmp_path / "whole"))
    real = runmod.train_run

    def killed_at_step_3(run, data, hooks=None):
        def on_checkpoint(state):
            if state.step == 3:
                raise Killed
        return real(run, data, hooks=TrainHooks(on_checkpoint=on_checkpoint))

    monkeypatch.setattr(runmod, "train_run", killed_at_step_3)
    with pytest.raises(Killed):
        rs.run_job("l1-mirrored", 3, 6, 3, str(tmp_path / "split"))
    monkeypatch.setattr(runmod, "train_run", real)
    assert load_run(tmp_path / "split").state.step == 3
    split = rs.run_job("l1-mirrored", 3, 6, 3, str(tmp_path / "split"))
    for key in ("f1", "uiqi", "best_f1"):
        assert split[key] == whole[key]
    a = load_run(tmp_path / "whole").state.model.state_dict()
    b = load_run(tmp_path / "split").state.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_arguments_exit_2(rs, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        rs.main(["--variants", "default,nope", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "--variants: unknown nope" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        rs.main(["--seeds", "a", "--out", str(tmp_path)])
    assert e.value.code == 2


def test_ripple_mode_scores_a_run_as_its_job_did_and_refuses_a_missing_one(rs, tmp_path, capsys):
    result = rs.run_job("default", 1, 4, 4, str(tmp_path / "run"))
    stored = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    assert stored["data"]["batch"] == 12  # the search's start (0.2.0's default), not today's
    scores = rs.network_scores(tmp_path / "run")
    assert scores["f1"] == pytest.approx(result["f1"], abs=1e-6)
    assert scores["ripple"] == result["ripple"] or (np.isnan(scores["ripple"])
                                                    and np.isnan(result["ripple"]))
    assert rs.main(["--ripple", str(tmp_path / "run")]) == 0
    assert f"| run | {result['f1']:.4f} |" in capsys.readouterr().out
    assert rs.main(["--ripple", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        rs.main(["--steps", "5"])
    assert e.value.code == 2


def test_a_run_folder_holding_other_files_is_refused_and_kept(rs, tmp_path, capsys):
    taken = tmp_path / "out" / "runs" / "default-s0-5"
    taken.mkdir(parents=True)
    (taken / "notes.txt").write_text("mine\n")
    args = ["--variants", "default", "--steps", "5", "--seeds", "0", "--workers", "1"]
    assert rs.main([*args, "--out", str(tmp_path / "out")]) == 2
    assert "default seed 0" in capsys.readouterr().err
    assert (taken / "notes.txt").read_text() == "mine\n"
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        rs.main([*args, "--out", str(tmp_path / "file")])
    assert e.value.code == 2
