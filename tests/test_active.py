"""Training only the active channels (minimize.active): equal in value to training the masked
network, disabled masks untouched, Adam moments carried both ways, exact resume."""

import dataclasses

import numpy as np
import pytest
import torch

from selfscale.data import ImageSet
from selfscale.minimize.active import narrow, train_active, widen_
from selfscale.model import Init, build_model
from selfscale.train import TrainHooks, TrainSpec, new_state, train

from conftest import gradient


def _images(n: int, seed: int) -> ImageSet:
    rng = np.random.default_rng(seed)
    xs = [np.clip(gradient((40, 40), phase=i) / 255 + 0.1 * rng.random((40, 40)), 0, 1)
          .astype(np.float32) for i in range(n)]
    ys = [np.abs(np.diff(x, axis=1, append=x[:, -1:])).astype(np.float32) * 4 for x in xs]
    return ImageSet(names=[f"i{i}" for i in range(n)], inputs=xs, targets=ys)


def _spec(**kw) -> TrainSpec:
    base = dict(loss="mae", batch=2, train_crop=24, eval_crop=32, flips=True, eval_every=10,
                checkpoint_every=0, device=torch.device("cpu"), init=Init("he"), lr=3e-3,
                schedule="cosine", warmup=0.1, schedule_steps=30)
    return TrainSpec(**(base | kw))


def _masked_state(seed: int = 0):
    """A 5/5/1 network trained 10 steps, then three masks disabled and frozen, Adam reset."""
    train_set = _images(4, seed)
    state = new_state(build_model((5, 5, 1), 5, 1, Init("he"), seed), 3e-3, seed,
                      torch.device("cpu"))
    train(state, train_set, train_set, _spec(), until_step=10)
    for layer, mask in [(0, 1), (0, 4), (1, 2)]:
        state.model.set_enabled(layer, mask, False)
        state.model.set_frozen(layer, mask, True)
    state.reset_optimizer()
    return state, train_set


def _clone(state):
    from selfscale.minimize.loop import clone_state
    return clone_state(state)


def test_active_training_equals_masked_training_and_leaves_disabled_masks_alone(monkeypatch):
    from selfscale.minimize import active as active_module
    trained_widths = []

    def spy(state, *args, **kw):
        trained_widths.append(state.model.widths)
        return train(state, *args, **kw)
    monkeypatch.setattr(active_module, "train", spy)
    state, data = _masked_state()
    masked, active = _clone(state), _clone(state)
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    train(masked, data, data, _spec(), until_step=40)
    train_active(active, data, data, _spec(), until_step=40)
    assert active.step == masked.step == 40 and trained_widths == [(3, 4, 1)]
    for (name, a), b in zip(active.model.state_dict().items(), masked.model.state_dict().values()):
        assert a.shape == b.shape
        assert torch.allclose(a.float(), b.float(), atol=2e-5), name
    assert torch.equal(active.model.layers[0].weight[1], before["layers.0.weight"][1])
    assert torch.equal(active.model.layers[1].weight[:, 4], before["layers.1.weight"][:, 4])
    assert torch.equal(active.model.layers[2].weight[:, 2], before["layers.2.weight"][:, 2])
    # the evaluations agree; the narrow network really was narrow
    for ra, rb in zip(active.history[-3:], masked.history[-3:]):
        assert ra["step"] == rb["step"] and ra["f1"] == pytest.approx(rb["f1"], abs=1e-5)
    # Adam's moments came back: zero for disabled masks, equal to the masked run's elsewhere
    ma = active.optimizer.state_dict()["state"]
    mb = masked.optimizer.state_dict()["state"]
    assert torch.equal(ma[0]["exp_avg"][1], torch.zeros_like(ma[0]["exp_avg"][1]))
    assert torch.allclose(ma[2]["exp_avg"], mb[2]["exp_avg"], atol=1e-6)
    assert int(ma[2]["step"]) == int(mb[2]["step"]) == 30


def test_narrow_then_widen_is_exact():
    state, data = _masked_state(1)
    train(state, data, data, _spec(), until_step=15)  # moments are non-trivial
    ref = _clone(state)
    small, kept = narrow(state)
    assert small.model.widths == (3, 4, 1) and kept == [[0, 2, 3], [0, 1, 3, 4], [0]]
    assert small.model.layers[1].weight.shape == (4, 3, 5, 5)
    widen_(state, small, kept)
    for a, b in zip(state.model.state_dict().values(), ref.model.state_dict().values()):
        assert torch.equal(a, b)
    sa, sb = state.optimizer.state_dict()["state"], ref.optimizer.state_dict()["state"]
    keep = torch.tensor(kept[0])
    assert torch.equal(sa[0]["exp_avg_sq"][keep], sb[0]["exp_avg_sq"][keep])


def test_a_killed_active_training_resumes_exactly():
    """Checkpoints during a narrow training hold the masked state; resuming from one ends on the
    same weights as an uninterrupted run."""
    state, data = _masked_state(2)
    spec = _spec(eval_every=7)
    whole = _clone(state)
    train_active(whole, data, data, spec, until_step=40)
    saved = []
    part = _clone(state)

    def on_checkpoint(s):
        saved.append(s.to_dict())
        if s.step == 21:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train_active(part, data, data, spec, until_step=40,
                     hooks=TrainHooks(on_checkpoint=on_checkpoint))
    assert saved[-1]["step"] == 21 and saved[-1]["model"]["layers.0.weight"].shape[0] == 5
    from selfscale.train import TrainState
    resumed = TrainState.from_dict(saved[-1], torch.device("cpu"))
    train_active(resumed, data, data, spec, until_step=40)
    for a, b in zip(resumed.model.state_dict().values(), whole.model.state_dict().values()):
        assert torch.equal(a, b)
    assert [r["f1"] for r in resumed.history] == [r["f1"] for r in whole.history]


def test_keep_best_on_the_narrow_network_comes_back_in_full_shape():
    state, data = _masked_state(3)
    spec = dataclasses.replace(_spec(), keep_best=True, eval_every=5, schedule_start=10)
    train_active(state, data, data, spec, until_step=40)
    assert state.best is not None
    assert state.best["model"]["layers.0.weight"].shape == (5, 1, 5, 5)
    best = state.best["model"]
    assert all(torch.equal(best[k], v) for k, v in state.model.state_dict().items())
