"""Run directories: config.toml is the one copy of the config, resume rules, served networks."""

import json

import pytest

from selfscale.config import (DataConfig, MinimizeConfig, ModelConfig, RunConfig, TaskConfig,
                              TrainConfig)
from selfscale.errors import CheckpointError, ConfigError
from selfscale.run import load_run, network, resume_run, start_run


@pytest.fixture
def run_dir(tmp_path, rect_folder):
    imgs = rect_folder("run-imgs", 4, (36, 40), seed=2, corner=(2, 16), size=(14, 16), level=0.8)
    cfg = RunConfig(data=DataConfig(data=imgs, crop=24, train_crop=None, batch=2,
                                    cache_dir=tmp_path / "c"),
                    task=TaskConfig(name="canny"),
                    model=ModelConfig(widths=(2, 1), kernel=3),
                    train=TrainConfig(steps=10, eval_every=5, threads=1, device="cpu"))
    start_run(cfg, tmp_path / "run")
    return tmp_path / "run"


def test_the_run_stores_a_resolved_config_once(run_dir):
    """config.toml holds every operator parameter and the task's loss; run.json no config."""
    run = load_run(run_dir)
    assert run.config.train.loss == "mse"  # canny's default, fixed when the run started
    assert run.config.task.params["sigma"] == pytest.approx(2 ** 0.5)
    assert "config" not in json.loads((run_dir / "run.json").read_text())


def test_config_toml_is_what_load_run_reads(run_dir):
    text = (run_dir / "config.toml").read_text().replace("eval_every = 5", "eval_every = 7")
    (run_dir / "config.toml").write_text(text)
    assert load_run(run_dir).config.train.eval_every == 7


def test_a_format_1_run_keeps_reading_its_run_json_config(run_dir):
    """Runs written by selfscale 0.1.0 kept the config in run.json: it is still read."""
    meta = json.loads((run_dir / "run.json").read_text())
    config = load_run(run_dir).config.to_dict()
    config["train"]["eval_every"] = 3
    (run_dir / "run.json").write_text(json.dumps(meta | {"format": 1, "config": config}))
    (run_dir / "config.toml").unlink()
    assert load_run(run_dir).config.train.eval_every == 3


def test_a_damaged_config_toml_is_one_error_naming_the_file(run_dir):
    (run_dir / "config.toml").write_text("[train]\nsteps = -1\n")
    with pytest.raises(CheckpointError, match=r"config.toml is invalid: --steps"):
        load_run(run_dir)


def test_configs_cannot_be_changed_after_validation():
    cfg = TrainConfig()
    with pytest.raises(AttributeError):
        cfg.steps = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        MinimizeConfig().threshold = 0.5  # type: ignore[misc]


def test_resume_accepts_equal_values_and_refuses_changes(run_dir):
    run = resume_run(run_dir, {"train": {"steps": 20, "lr": 3e-3, "eval_every": 5},
                               "task": {"name": "canny", "params": {"sigma": "1.4142135623730951"}},
                               "model": {"widths": (2, 1)}})
    assert run.config.train.steps == 20
    with pytest.raises(ConfigError, match=r"--widths: cannot be changed when resuming \(the run "
                                          r"has 2,1, given 3,1\)"):
        resume_run(run_dir, {"model": {"widths": (3, 1)}})
    with pytest.raises(ConfigError, match="--task-param: cannot be changed"):
        resume_run(run_dir, {"task": {"params": {"sigma": 2}}})


def test_a_run_serves_the_base_network_until_minimized(run_dir):
    run = load_run(run_dir)
    model, stage = network(run)
    assert stage == "base" and model is run.state.model
    with pytest.raises(CheckpointError, match="has not been minimized"):
        network(run, "minimized")
    with pytest.raises(ConfigError, match="--stage"):
        network(run, "final")
