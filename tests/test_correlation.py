"""The ``correlation`` study (Table 4.1, Fig 4.1): mask features on known weights, a constructed
network whose answer is known (a duplicated mask), the coefficients against scipy recomputed from
the raw table, and the study end to end at smoke scale on a real 2-worker LocalCluster."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from scipy import stats

from selfscale.cli import main
from selfscale.config import DataConfig, ModelConfig, RunConfig, TaskConfig, TrainConfig
from selfscale.model import FCN
from selfscale.run import prepare_data, save_run, start_run, train_run
from selfscale.study.correlation import LABELS, METHODS, TARGETS, mask_rows
from selfscale.study.trials import RUN_FILES
from selfscale.study.worth import FEATURES, mask_features, worth_trial

SMOKE = ["study", "correlation", "--scale", "smoke", "--seeds", "1", "--base-steps", "100",
         "--retrain-steps", "20", "--judge-every", "10", "--quiet"]


def test_mask_features_on_known_vectors():
    """Masks (w, b) = (1, 0), (2, 0), (-1, 0), (0, 1): mask 1's cosines to the others are 1, -1
    and 0."""
    model = FCN((4, 1), kernel=1)
    with torch.no_grad():
        model.layers[0].weight.copy_(torch.tensor([1.0, 2.0, -1.0, 0.0]).view(4, 1, 1, 1))
        model.layers[0].bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))
    f = mask_features(model, 0, 0, {(0, 0): 0.25})
    assert list(f) == list(FEATURES)
    expected = {"cos_max": 1, "cos_2nd_max": 0, "cos_3rd_max": -1, "cos_min": -1, "cos_mean": 0,
                "cos_median": 0, "cos_std": math.sqrt(2 / 3), "abs_max": 1, "abs_2nd_max": 1,
                "abs_3rd_max": 0, "abs_min": 0, "abs_mean": 2 / 3, "abs_median": 1,
                "abs_std": math.sqrt(2 / 9), "l1": 1.0, "taylor": 0.25}
    for name, value in expected.items():
        assert f[name] == pytest.approx(value, abs=1e-12), name
    model.set_enabled(0, 1, False)  # a removed mask is not one of "the others"
    assert mask_features(model, 0, 0, {})["cos_3rd_max"] != mask_features(model, 0, 0, {})[
        "cos_3rd_max"]  # NaN: only two other masks are left


def test_a_duplicated_mask_is_found_redundant(tmp_path, rect_folder):
    """Mask 2 of layer 1 is made a copy of mask 1, and layer 2's weights on it are moved onto
    mask 1, so the network computes the same function: mask 2's max cosine is 1 and disabling
    it loses nothing, while disabling its twin, which now carries both, costs much more."""
    imgs = rect_folder("corr-imgs", 6, (40, 44), seed=2, corner=(3, 20), size=(15, 17), level=0.9)
    run = start_run(RunConfig(
        data=DataConfig(data=imgs, crop=32, train_crop=None, batch=2, eval_fraction=0.34,
                        cache_dir=tmp_path / "c"),
        task=TaskConfig(name="sobel"), model=ModelConfig(widths=(3, 3, 1), kernel=3),
        train=TrainConfig(steps=60, eval_every=30, seed=0, device="cpu", threads=1)),
        tmp_path / "base")
    train_run(run, prepare_data(run.config))
    first, second = run.state.model.layers[:2]
    with torch.no_grad():
        first.weight[1] = first.weight[0]
        first.bias[1] = first.bias[0]
        second.weight[:, 0] += second.weight[:, 1]
        second.weight[:, 1] = 0
    save_run(run)
    base = {"result": {}, "files": {n: (run.path / n).read_bytes() for n in RUN_FILES
                                    if (run.path / n).is_file()}}
    plan, records = [], {}
    for layer, mask in [(None, None), (1, 1), (1, 2), (1, 3)]:
        name = "ref" if layer is None else f"l{layer}m{mask}"
        trial = {"id": f"worth-{name}-s0", "kind": "worth", "needs": "train", "seed": 0,
                 "layer": layer, "mask": mask, "steps": 10, "every": 5}
        plan.append(trial)
        records[trial["id"]] = {"status": "done", **worth_trial(trial, base)}
    rows = {r["mask"]: r for r in mask_rows(plan, records)}
    assert rows[2]["cos_max"] == pytest.approx(1.0, abs=1e-9)
    assert rows[1]["cos_max"] == pytest.approx(1.0, abs=1e-9)
    assert abs(rows[2]["loss"]) < 1e-4
    assert rows[1]["loss"] > rows[2]["loss"] + 0.01  # its twin now carries both
    assert rows[2]["score_0"] == pytest.approx(rows[2]["reference_0"], rel=1e-4)
    assert [len(records[t["id"]]["result"]["curve"]["step"]) for t in plan] == [3] * 4


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """A finished smoke-scale correlation study: one repetition, 12 trials."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SELFSCALE_CACHE", str(tmp_path_factory.mktemp("worker-cache")))
        out = tmp_path_factory.mktemp("corr") / "study"
        assert main([*SMOKE, "--workers", "2", "--out", str(out)]) == 0
    return out


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_the_study_writes_table_41_the_raw_table_and_fig_41(study_dir, capsys):
    assert len(list((study_dir / "trials").glob("worth-*.json"))) == 11
    masks = _csv(study_dir / "masks.csv")
    assert [(int(r["layer"]), int(r["mask"])) for r in masks] == [
        (layer, m) for layer in (1, 2) for m in range(1, 6)]
    html = (study_dir / "report.html").read_text()
    assert "Table 4.1" in html and "data:image/png;base64," in html
    assert "| max |" in (study_dir / "correlation.md").read_text()
    for ext in ("png", "svg"):
        assert (study_dir / "figures" / f"drop-gain.{ext}").stat().st_size > 1000
    assert main([*SMOKE, "--out", str(study_dir), "--no-report"]) == 0
    assert "0 done now, 12 skipped" in capsys.readouterr().out


def test_the_coefficients_equal_scipy_recomputed_from_the_raw_table(study_dir):
    masks = _csv(study_dir / "masks.csv")
    table = {r["feature"]: r for r in _csv(study_dir / "correlation.csv")}
    assert list(table) == list(LABELS)
    functions = {"pearson": stats.pearsonr, "kendall": stats.kendalltau,
                 "spearman": stats.spearmanr}
    checked = 0
    for feature in LABELS:
        for target in TARGETS:
            pairs = [(float(r[feature]), float(r[target])) for r in masks]
            pairs = [p for p in pairs if all(map(math.isfinite, p))]
            for method in METHODS:
                want = functions[method](*zip(*pairs))
                got = float(table[feature][f"{target}_{method}"])
                assert got == pytest.approx(want.statistic, abs=1e-12)
                assert float(table[feature][f"{target}_{method}_p"]) == pytest.approx(
                    want.pvalue, abs=1e-12)
                checked += 1
    assert checked == len(LABELS) * 6


@pytest.mark.parametrize("args, message", [
    (["--judge-every", "30"], "--judge-every: must be an integer from 1 to --retrain-steps"),
    (["--thresholds", "0.9"], "unrecognized arguments: --thresholds"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    try:
        code = main([*SMOKE, *args, "--out", str(tmp_path / "x")])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "x").exists()
