"""Study specs, plans and table statistics, without a cluster: scales, overrides, the commands
that reproduce a study, base networks shared by their minimizations, known statistics."""

from __future__ import annotations

import math
import shlex

import pytest

from selfscale.cli import build_parser
from selfscale.errors import ConfigError
from selfscale.study import gridsearch, strategies
from selfscale.study.command import _spec
from selfscale.study.engine import check_plan
from selfscale.study.report import reproduce
from selfscale.study.specs import resolve_spec, spec_difference
from selfscale.study.tables import stats, widths_counts


def _resolve(module, scale="smoke", **given):
    return resolve_spec(module.Spec, module.NAME, module.SCALES, scale, given)


def test_the_thesis_scale_has_the_thesis_counts():
    """50 runs per threshold, 10 000 base steps with the thesis recipe, 2000 retrain steps."""
    spec = _resolve(strategies, "thesis")
    assert (spec.seeds, spec.base_steps, spec.retrain_steps, spec.recipe) == (
        50, 10_000, 2000, "thesis")
    assert spec.thresholds == (0.85, 0.90, 0.95, 0.98, 1.00)
    assert spec.run_config((5, 5, 1), 7)["data"]["batch"] == 3


def test_every_count_can_be_overridden_and_lists_come_as_text():
    spec = _resolve(strategies, seeds=3, base_steps=50, thresholds="1,0.9", strategies="seq,l1",
                    retrain_steps=5, finetune_steps=7, layers=False, reference="base")
    assert (spec.seeds, spec.base_steps, spec.retrain_steps, spec.finetune_steps) == (3, 50, 5, 7)
    assert spec.thresholds == (0.9, 1.0) and spec.strategies == ("seq", "l1")
    m = spec.minimize_config("seq", 0.9, 2)
    assert (m["layers"], m["reference"], m["seed"], m["finetune_steps"]) == (False, "base", 2, 7)


@pytest.mark.parametrize("given, message", [
    ({"thresholds": "0.9,0.9"}, "--thresholds: must be a comma-separated list of distinct"),
    ({"thresholds": "0,1"}, "--thresholds: every threshold must be in (0, 1]"),
    ({"seeds": 1001}, "--seeds: must be an integer from 1 to 1000, got 1001"),
    ({"base_steps": 0}, "--base-steps: must be an integer from 1"),
    ({"retrain_steps": 0}, "--retrain-steps: must be an integer from 1"),
    ({"train_crop": 4}, "--train-crop: must be an integer between 8 and 8192, got 4"),
    ({"task": "pairs"}, "--task: must be one of sobel, canny, otsu"),
])
def test_a_bad_value_names_its_flag(given, message):
    with pytest.raises(ConfigError) as info:
        _resolve(strategies, **given)
    assert message in str(info.value)


def test_an_unknown_scale_is_refused():
    with pytest.raises(ConfigError, match="--scale: must be one of smoke, laptop, thesis"):
        _resolve(strategies, "huge")


def test_a_strategies_plan_trains_one_base_per_seed_for_all_its_minimizations():
    plan = check_plan(strategies.plan(_resolve(strategies)))
    bases = [t for t in plan if t["kind"] == "train"]
    assert [t["id"] for t in bases] == ["train-5x5x1-s0", "train-5x5x1-s1"]
    assert len(plan) == 2 + 2 * 2 * 5
    assert {t["needs"] for t in plan if t["kind"] == "minimize" and t["seed"] == 1} == {
        "train-5x5x1-s1"}
    assert {t["minimize"]["seed"] for t in plan if t["kind"] == "minimize"} == {0, 1}


def test_a_gridsearch_plan_minimizes_its_own_full_networks():
    """The grid's (5, 5, 1) networks are the minimizer's base networks: no second training."""
    plan = check_plan(gridsearch.plan(_resolve(gridsearch, seeds=2)))
    trains = [t for t in plan if t["kind"] == "train"]
    assert len(trains) == 25 * 2 and len(plan) == 50 + 2 * 5
    assert {t["needs"] for t in plan if t["kind"] == "minimize"} == {
        "train-5x5x1-s0", "train-5x5x1-s1"}
    deep = gridsearch.configurations(_resolve(gridsearch, depths="2,4", max_width=2))
    assert deep == [(1, 1), (2, 1), (1, 1, 1, 1), (1, 1, 2, 1), (1, 2, 1, 1), (1, 2, 2, 1),
                    (2, 1, 1, 1), (2, 1, 2, 1), (2, 2, 1, 1), (2, 2, 2, 1), (2, 2, 1)]


@pytest.mark.parametrize("module, given", [
    (strategies, {"seeds": 3, "thresholds": "0.9,1", "strategies": "seq,l1", "layers": False}),
    (gridsearch, {"max_width": 3, "depths": "2,3", "strategy": "taylor", "task": "canny"}),
])
def test_the_reproducing_command_rebuilds_the_spec(module, given, tmp_path):
    spec = _resolve(module, **given).to_dict()
    command = reproduce({"spec": spec}, tmp_path / "s")[0]
    args = build_parser("study").parse_args(shlex.split(command)[1:])
    assert spec_difference(spec, _spec(args)[1].to_dict()) is None


def test_statistics_over_seeds():
    s = stats([0.9, 0.8, 1.0], higher_is_better=True)
    assert (s.n, s.mean, s.worst) == (3, pytest.approx(0.9), 0.8)
    assert s.std == pytest.approx(0.1)
    assert stats([4, 6], higher_is_better=False).worst == 6
    empty = stats([], higher_is_better=True)
    assert empty.n == 0 and math.isnan(empty.mean)
    assert widths_counts([(4, 4, 1), (3, 4, 1), (4, 4, 1)]) == "(4, 4, 1) ×2, (3, 4, 1) ×1"
    assert widths_counts([(5, 5, 1), (4, 4, 1), (3, 4, 1), (2, 2, 1)], top=2) == (
        "(2, 2, 1) ×1, (3, 4, 1) ×1, …")
