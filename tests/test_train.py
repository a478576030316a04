"""Training: determinism by seed, exact resume after a kill, evaluation, dead-init revival."""

import dataclasses

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


def _config(image_dir, cache, steps=30, seed=0, task="sobel", conv="auto"):
    return RunConfig(
        data=DataConfig(data=image_dir, crop=32, train_crop=None, batch=2, eval_fraction=0.34,
                        cache_dir=cache),
        task=TaskConfig(name=task),
        model=ModelConfig(widths=(3, 2, 1), kernel=3, init_std=0.2),
        train=TrainConfig(steps=steps, eval_every=10, lr=0.01, seed=seed, device="cpu", threads=1,
                          conv=conv),
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


@pytest.mark.parametrize("conv", ["auto", "torch"])
def test_killed_run_resumes_bit_identical(image_dir, tmp_path, conv):
    """Kill at step 25 (last checkpoint at 20), resume to 40: same weights, Adam, RNG, scores;
    on either convolution (auto: the direct kernels with fused Adam where they build)."""
    full = _train(start_run(_config(image_dir, tmp_path / "c", steps=40, conv=conv),
                            tmp_path / "full"))

    def kill(step, loss):
        if step == 25:
            raise _Kill

    run = start_run(_config(image_dir, tmp_path / "c", steps=40, conv=conv), tmp_path / "part")
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
    seconds = [r["train_seconds"] for r in b["history"]]
    assert seconds == sorted(seconds) and seconds[-1] > seconds[1] > 0  # counted across the kill


def test_steps_in_kernel_calls_equal_steps_one_by_one(image_dir, tmp_path, monkeypatch):
    """With no hook that reads single steps (none, or a progress bar's), the steps between
    pauses run in kernel calls of up to 64: the same weights, Adam state, generator and scores
    as one by one (a hook that reads the state), and a progress hook still sees every step."""
    from selfscale import direct_step

    calls = []
    real = direct_step.train_steps
    monkeypatch.setattr(direct_step, "train_steps",
                        lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    seen = []
    runs = {"one by one": TrainHooks(on_step=lambda step, loss: None),
            "progress": TrainHooks(on_step=lambda step, loss: seen.append(step),
                                   on_step_reads_state=False),
            "no hook": None}
    for name, hooks in runs.items():
        cfg = _config(image_dir, tmp_path / "c", steps=150, conv="direct")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_every=100))
        _train(start_run(cfg, tmp_path / name), hooks=hooks)
    a = _weights(tmp_path / "one by one")
    for name in ("progress", "no hook"):
        b = _weights(tmp_path / name)
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        assert all(torch.equal(t, b["optimizer"]["state"][pid][key])
                   for pid, st in a["optimizer"]["state"].items() for key, t in st.items())
        assert a["rng"] == b["rng"] and _scores(a["history"]) == _scores(b["history"])
    assert seen == list(range(1, 151))
    assert calls == [64, 36, 50] * 2  # to the evaluation at 100, then to the end


def test_a_hook_every_n_steps_sees_the_state_of_its_step(image_dir, tmp_path):
    """on_every runs at a pause after every 7th step (the steps in between in kernel calls):
    it sees the weights a step-by-step hook sees at those steps."""
    def grab(store, state):
        store[state.step] = state.model.layers[0].weight.detach().clone()

    every, by_step = {}, {}
    cfg = _config(image_dir, tmp_path / "c", steps=40, conv="direct")
    _train(start_run(cfg, tmp_path / "a"),
           hooks=TrainHooks(every=7, on_every=lambda state: grab(every, state)))
    run = start_run(cfg, tmp_path / "b")
    _train(run, hooks=TrainHooks(on_step=lambda step, loss: step % 7 or grab(by_step, run.state)))
    assert sorted(every) == sorted(by_step) == [7, 14, 21, 28, 35]
    assert all(torch.equal(every[s], by_step[s]) for s in every)
    assert not torch.equal(every[7], every[14])


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


def test_a_non_finite_weight_stops_training_and_keeps_the_last_good_checkpoint(image_dir,
                                                                               tmp_path):
    """A NaN injected into a weight after step 25: the next step's loss is NaN, training stops
    with a TrainingError naming step 26, and the checkpoint of step 20 resumes exactly."""
    from selfscale.errors import TrainingError

    full = _train(start_run(_config(image_dir, tmp_path / "c", steps=40), tmp_path / "full"))

    def poison(step, loss):
        if step == 25:
            with torch.no_grad():
                run.state.model.layers[1].weight[0, 0, 0, 0] = float("nan")

    run = start_run(_config(image_dir, tmp_path / "c", steps=40), tmp_path / "part")
    with pytest.raises(TrainingError, match=r"diverged at step 26: the training loss is nan.*"
                                            r"last checkpoint is kept.*lower --lr"):
        _train(run, hooks=TrainHooks(on_step=poison))
    again = load_run(tmp_path / "part")
    assert again.state.step == 20 and all(torch.isfinite(p).all()
                                          for p in again.state.model.parameters())
    _train(again)
    assert _scores(full.state.history) == _scores(again.state.history)


def test_diverged_training_is_one_line_with_exit_code_1(image_dir, tmp_path, capsys,
                                                        monkeypatch):
    import selfscale.direct_step
    import selfscale.train
    from selfscale.cli import main

    monkeypatch.setattr(selfscale.train, "train_step", lambda *a: float("inf"))
    monkeypatch.setattr(selfscale.direct_step, "train_steps", lambda *a: [float("inf")])
    assert main(["train", "--data", str(image_dir), "--crop", "24", "--train-crop", "24", "--steps", "5",
                 "--out", str(tmp_path / "r"), "--threads", "1", "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("selfscale: error: training diverged at step 1: the training loss is inf; "
                   "nothing from this step on was saved, the last checkpoint is kept (hint: "
                   "lower --lr, now 0.003)")


def test_a_dead_network_is_reported_and_not_minimized(image_dir, tmp_path, capsys):
    """lr 10 kills the output ReLU: a warning with a hint, run.json says dead, minimize refuses."""
    import json

    from selfscale.cli import main

    run = tmp_path / "r"
    assert main(["train", "--data", str(image_dir), "--crop", "24", "--train-crop", "24", "--steps", "20",
                 "--lr", "10",
                 "--out", str(run), "--threads", "1", "--quiet"]) == 0
    assert "the network is dead" in capsys.readouterr().err
    assert json.loads((run / "run.json").read_text())["dead"] is True
    assert main(["minimize", str(run), "--quiet"]) == 2
    assert "the base network is dead" in capsys.readouterr().err


def test_learning_rate_schedule_known_values():
    """Linear warm-up over ⌊0.1·100⌋ = 10 steps, then cosine from lr to 1% of it; a retrain's
    spec restarts the schedule at its own first step."""
    import math

    from selfscale.model import Init
    from selfscale.train import TrainSpec, learning_rate

    spec = TrainSpec(loss="mae", batch=1, train_crop=8, eval_crop=8, flips=False, eval_every=10,
                     checkpoint_every=0, device=torch.device("cpu"), init=Init(), lr=0.1,
                     schedule="cosine", warmup=0.1, schedule_steps=100)
    assert learning_rate(spec, 0) == pytest.approx(0.01)
    assert learning_rate(spec, 9) == pytest.approx(0.1)
    assert learning_rate(spec, 10) == pytest.approx(0.1)
    assert learning_rate(spec, 55) == pytest.approx(0.1 * (0.01 + 0.99 * 0.5 *
                                                           (1 + math.cos(math.pi * 0.5))))
    assert learning_rate(spec, 100) == pytest.approx(0.001)
    assert learning_rate(spec, 500) == pytest.approx(0.001)
    retrain = spec.for_retrain(1000, 20)
    assert learning_rate(retrain, 1000) == pytest.approx(0.05)  # warm-up of 2 steps restarts
    assert (retrain.eval_every, retrain.checkpoint_every) == (20, 0)
    constant = dataclasses.replace(spec, schedule="constant")
    assert learning_rate(constant, 0) == learning_rate(constant, 99) == 0.1


def test_keep_best_ends_on_the_best_evaluation(image_dir, tmp_path):
    """--keep-best: the weights after training are those of the evaluation with the best F1."""
    run = start_run(dataclasses.replace(
        _config(image_dir, tmp_path / "c", steps=60),
        train=TrainConfig(steps=60, eval_every=10, seed=0, device="cpu", threads=1,
                          keep_best=True)), tmp_path / "r")
    _train(run)
    best = max(run.state.history, key=lambda r: (r["f1"], -r["step"]))
    assert run.state.best["step"] == best["step"]
    for k, v in run.state.model.state_dict().items():
        assert torch.equal(v.cpu(), run.state.best["model"][k]), k


def test_stop_after_stops_on_stagnation_and_stays_stopped(image_dir, tmp_path):
    """--stop-after 1 with a learning rate too small to improve: training stops at the first
    evaluation that does not beat the best, and a resumed run does not go on."""
    cfg = dataclasses.replace(_config(image_dir, tmp_path / "c", steps=200),
                              train=TrainConfig(steps=200, eval_every=10, lr=1e-9,
                                                schedule="constant", stop_after=1, seed=0,
                                                device="cpu", threads=1))
    run = _train(start_run(cfg, tmp_path / "r"))
    assert run.state.step < 200 and run.state.history[-1]["stopped"]
    steps = run.state.step
    assert _train(load_run(tmp_path / "r")).state.step == steps
