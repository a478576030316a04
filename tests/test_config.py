"""Configs: validation messages name the flag; dict and TOML round trips are exact."""

import pytest

from selfscale.config import (DataConfig, MinimizeConfig, ModelConfig, RunConfig, TaskConfig,
                              TrainConfig, minimize_config_for)
from selfscale.tomlfile import dumps_toml, load_toml
from selfscale.errors import ConfigError


def test_run_config_round_trips_through_toml(tmp_path):
    """to_dict → TOML file → from_dict gives the same config, params table included."""
    cfg = RunConfig(data=DataConfig(data=tmp_path, crop=64, train_crop=32, flips=True),
                    task=TaskConfig(name="canny", params={"sigma": 2.0, "mode": "nearest",
                                                          "low_threshold": None}),
                    model=ModelConfig(widths=(4, 3, 1), kernel=3),
                    train=TrainConfig(steps=7, loss="f1", lr=0.002))
    path = tmp_path / "c.toml"
    path.write_text(dumps_toml(cfg.to_dict()))
    back = RunConfig.from_dict(load_toml(path))
    expected = cfg.to_dict()
    expected["task"]["params"].pop("low_threshold")
    assert back.to_dict() == expected
    assert back.model.widths == (4, 3, 1) and back.data.data == tmp_path
    assert back.task.params == {"sigma": 2.0, "mode": "nearest"}  # None values are not stored


@pytest.mark.parametrize("raw, flag", [
    ({"model": {"widths": 5}}, "--widths"),
    ({"model": {"widths": [5, 5, 2]}}, "--widths"),
    ({"model": {"kernel": 4}}, "--kernel"),
    ({"data": {"data": 5}}, "--data"),
    ({"data": {"flips": "yes"}}, "--flips"),
    ({"data": {"crop": 4}}, "--crop"),
    ({"data": {"eval_fraction": 1.0}}, "--eval-fraction"),
    ({"data": {"eval_targets": "x"}}, "--eval-targets"),
    ({"train": {"steps": "x"}}, "--steps"),
    ({"train": {"loss": "huber"}}, "--loss"),
    ({"train": {"device": "tpu"}}, "--device"),
    ({"train": {"nope": 1}}, "unknown key"),
    ({"extra": {}}, "unknown section"),
    ({"train": 5}, r"\[train\] must be a table"),
    (5, "expected tables"),
])
def test_bad_values_name_the_flag(raw, flag):
    """Each bad value raises ConfigError whose message names the flag (or the config key)."""
    with pytest.raises(ConfigError, match=flag):
        RunConfig.from_dict(raw)


@pytest.mark.parametrize("kw, flag", [
    ({"threshold": 0.0}, "--threshold"), ({"threshold": 1.01}, "--threshold"),
    ({"mode": "zero"}, "--mode"), ({"reference": "best"}, "--reference"),
    ({"retrain_steps": 0}, "--retrain-steps"), ({"metric": "psnr"}, "--metric"),
])
def test_minimize_config_validation(kw, flag):
    """Thresholds outside (0, 1], unknown modes and references are refused by name."""
    with pytest.raises(ConfigError, match=flag):
        MinimizeConfig(**kw)


def test_thesis_thresholds_are_all_valid():
    """0.85, 0.90, 0.95, 0.98 and 1.00 (thesis 2.4.2) are accepted."""
    for t in (0.85, 0.90, 0.95, 0.98, 1.0):
        assert MinimizeConfig(threshold=t).threshold == t


def test_toml_errors_name_the_file(tmp_path):
    """A missing or malformed config file is one clear error."""
    with pytest.raises(ConfigError, match="not found"):
        load_toml(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[data\ncrop = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(bad)


def test_the_thesis_recipe_is_a_preset_below_flags():
    """--recipe thesis: Adam at a constant 1e-3, truncated normal 0.05, batch 3, 256² crops,
    10 000 steps; a value given explicitly still wins."""
    thesis = RunConfig.from_dict({"train": {"recipe": "thesis"}})
    assert (thesis.data.batch, thesis.data.train_crop, thesis.data.crop) == (3, 256, 256)
    assert (thesis.train.lr, thesis.train.schedule, thesis.train.steps) == (1e-3, "constant",
                                                                            10_000)
    assert (thesis.model.init, thesis.model.init_std) == ("trunc-normal", 0.05)
    tweaked = RunConfig.from_dict({"train": {"recipe": "thesis", "lr": 5e-4},
                                   "data": {"batch": 6}})
    assert tweaked.train.lr == 5e-4 and tweaked.data.batch == 6
    assert tweaked.train.schedule == "constant"
    default = RunConfig.from_dict({})
    assert (default.train.recipe, default.train.schedule, default.model.init) == (
        "capacity", "cosine", "he")
    assert RunConfig.from_dict(thesis.to_dict()) == thesis  # a stored config round-trips
    assert thesis.train.eval_every == 500  # selfscale 0.1.0's, so its histories are reproduced
    assert (default.data.batch, default.data.train_crop, default.train.steps,
            default.train.eval_every) == (3, 64, 110_000, 5000)


def test_minimize_defaults_follow_the_runs_recipe():
    """A retrain step is a step of the run's recipe: the capacity recipe retrains 7000 steps and
    fine-tunes 17 500, a thesis-recipe run keeps the thesis's 2000 (and a 5000-step fine-tune);
    a value given as a flag wins over both."""
    capacity = minimize_config_for("capacity", {})
    assert (capacity.retrain_steps, capacity.finetune_steps) == (7000, 17_500)
    thesis = minimize_config_for("thesis", {"threshold": 0.9})
    assert (thesis.retrain_steps, thesis.finetune_steps, thesis.threshold) == (2000, 5000, 0.9)
    given = minimize_config_for("thesis", {"retrain_steps": 300, "finetune_steps": 0})
    assert (given.retrain_steps, given.finetune_steps) == (300, 0)
    with pytest.raises(ConfigError, match="--retrain-steps"):
        minimize_config_for("thesis", {"retrain_steps": 0})


@pytest.mark.parametrize("raw, flag", [({"train": {"recipe": "fast"}}, "--recipe"),
                                       ({"train": {"schedule": "step"}}, "--schedule"),
                                       ({"train": {"warmup": 0.9}}, "--warmup"),
                                       ({"model": {"init": "xavier"}}, "--init"),
                                       ({"train": {"stop_after": -1}}, "--stop-after")])
def test_recipe_settings_are_validated(raw, flag):
    with pytest.raises(ConfigError, match=flag):
        RunConfig.from_dict(raw)
