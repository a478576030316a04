"""Training: determinism by seed, exact resume after a kill, evaluation, dead-init revival."""

import pytest
import torch

from selfscale.checkpoint import load_state
from selfscale.config import DataConfig, ModelConfig, RunConfig, TaskConfig, TrainConfig
from selfscale.run import load_run, prepare_data, start_run, train_run
from selfscale.train import TrainHooks, evaluate, revive_dead_init



def _train(run, hooks=None):
    return train_run(run, prepare_data(run.config), hooks=hooks)


@pytest.fixture(scope="module")
def image_dir(rect_folder):
    """Six 48×56 grayscale images with rectangles and gradients."""
    return rect_folder("imgs", 6, (48, 56), seed=0, corner=(4, 30), size=(14, 18), level=0.8,
                       ramp=0.2)


def _config(image_dir, cache, steps=30, seed=0, task="sobel"):
    return RunConfig(
        data=DataConfig(data=image_dir, crop=32, batch=2, eval_fraction=0.34, cache_dir=cache),
        task=TaskConfig(name=task),
        model=ModelConfig(widths=(3, 2, 1), kernel=3, init_std=0.2),
        train=TrainConfig(steps=steps, eval_every=10, lr=0.01, seed=seed, device="cpu", threads=1),
    )


def _weights(path):
    return load_state(path / "state.pt")


def _scores(history):
    return [{k: v for k, v in r.items() if k != "train_seconds"} for r in history]


def test_same_seed_gives_bit_identical_weights(image_dir, tmp_path):
    """Two runs with the same seed and threads end with identical weights and Adam state."""
    a = _train(start_run(_config(image_dir, tmp_path / "c"), tmp_path / "a"))
    b = _train(start_run(_config(image_dir, tmp_path / "c"), tmp_path / "b"))
    sa, sb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    assert _scores(a.state.history) == _scores(b.state.history)
    c = _train(start_run(_config(image_dir, tmp_path / "c", seed=1), tmp_path / "d"))
    assert not torch.equal(c.state.model.layers[0].weight, a.state.model.layers[0].weight)


def test_training_lowers_the_loss(image_dir, tmp_path):
    """300 steps of Sobel on rectangles raise F1 clearly above its value at step 10."""
    run = _train(start_run(_config(image_dir, tmp_path / "c", steps=300), tmp_path / "r"))
    f1 = [r["f1"] for r in run.state.history]
    assert f1[-1] > f1[0] + 0.05
    assert [r["step"] for r in run.state.history] == list(range(10, 301, 10))


class _Kill(Exception):
    pass


def test_killed_run_resumes_bit_identical(image_dir, tmp_path):
    """Kill at step 25 (last checkpoint at 20), resume to 40: same weights, Adam, RNG, scores."""
    full = _train(start_run(_config(image_dir, tmp_path / "c", steps=40), tmp_path / "full"))

    def kill(step, loss):
        if step == 25:
            raise _Kill

    run = start_run(_config(image_dir, tmp_path / "c", steps=40), tmp_path / "part")
    with pytest.raises(_Kill):
        _train(run, hooks=TrainHooks(on_step=kill))
    moved = tmp_path / "moved"
    (tmp_path / "part").rename(moved)  # a run directory can be moved before it is resumed
    again = load_run(moved)
    assert again.state.step == 20
    _train(again)
    a, b = _weights(tmp_path / "full"), _weights(moved)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for pid, st in a["optimizer"]["state"].items():
        for name, t in st.items():
            assert torch.equal(t, b["optimizer"]["state"][pid][name])
    assert a["rng"] == b["rng"] and a["step"] == b["step"] == 40
    assert _scores(full.state.history) == _scores(b["history"])


def test_evaluate_matches_metric_functions(image_dir, tmp_path):
    """evaluate() is the per-image metric mean over centre crops of the eval set."""
    from selfscale.crops import center_crops
    from selfscale.metrics import f1_score, uiqi
    from selfscale.run import prepare_data

    cfg = _config(image_dir, tmp_path / "c")
    run = start_run(cfg, tmp_path / "r")
    data = prepare_data(cfg)
    scores = evaluate(run.state.model, data.eval, 32, torch.device("cpu"))
    x, y = center_crops(data.eval, 32)
    with torch.no_grad():
        out = run.state.model(torch.from_numpy(x))
    assert scores["n_images"] == len(data.eval) == 2
    assert scores["f1"] == pytest.approx(float(f1_score(out, torch.from_numpy(y)).mean()), rel=1e-6)
    assert scores["uiqi"] == pytest.approx(float(uiqi(out, torch.from_numpy(y)).mean()), rel=1e-6)


def test_dead_initialization_is_redrawn():
    """An all-zero output (dead ReLU network) is redrawn until the output is alive."""
    from selfscale.model import build_model
    from selfscale.train import new_state

    model = build_model((5, 5, 1), 5, 1, 0.05, seed=0)
    state = new_state(model, 1e-3, 0, torch.device("cpu"))
    probe = torch.rand(3, 1, 20, 20, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer in state.model.layers:  # force a dead network
            layer.bias.fill_(-1.0)
    n = revive_dead_init(state, probe, 0.05)
    assert n >= 1
    with torch.no_grad():
        assert (state.model(probe) > 0).any()
