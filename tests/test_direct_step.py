"""The one-call training step (selfscale.direct_step) against the autograd step it replaces."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from selfscale import direct, direct_step
from selfscale.metrics import LOSSES
from selfscale.model import FCN
from selfscale.train import TrainState, make_optimizer, new_state, to_device, train_step

needs_kernels = pytest.mark.skipif(direct.library() is None,
                                   reason=f"direct kernels not built: {direct.failure()}")

CASES = {
    "thesis 5/5/1": {"widths": (5, 5, 1)},
    "masks off and frozen": {"widths": (5, 5, 1), "off": ((0, 1), (1, 3)), "frozen": ((0, 2),)},
    "k=3, four layers, clipped": {"widths": (3, 7, 9, 1), "kernel": 3, "frozen": ((1, 0),),
                                  "clip": 0.05},
    "k=7, RGB input": {"widths": (4, 1), "kernel": 7, "in_channels": 3},
    "narrower than one strip, shorter than the kernel": {"widths": (2, 2, 1), "kernel": 7,
                                                         "shape": (3, 5, 9)},
}


def _net(case: dict, seed: int = 0) -> FCN:
    torch.manual_seed(seed)
    model = FCN(case["widths"], case.get("kernel", 5), case.get("in_channels", 1))
    for layer in model.layers:  # positive biases: most ReLUs pass, so every path is exercised
        torch.nn.init.uniform_(layer.bias, 0.0, 0.2)
    for layer, mask in case.get("off", ()):
        model.set_enabled(layer, mask, False)
    for layer, mask in case.get("frozen", ()):
        model.set_frozen(layer, mask, True)
    return to_device(model, torch.device("cpu"))  # channels_last weights, as in a run


def _batches(case: dict, steps: int, shape=(2, 21, 37)):
    gen = torch.Generator().manual_seed(1)
    n, h, w = shape
    c = case.get("in_channels", 1)
    return [(torch.rand(n, c, h, w, generator=gen).contiguous(memory_format=torch.channels_last),
             torch.rand(n, 1, h, w, generator=gen)) for _ in range(steps)]


def _autograd_step(model, optimizer, x, y, loss_fn, clip):
    """selfscale.train.train_step's autograd path, written out."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return float(loss.detach())


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    return bool((a - b).abs().max() <= rel * max(float(b.abs().max()), 1e-12))


@needs_kernels
@pytest.mark.parametrize("loss", sorted(direct_step.LOSS_CODES))
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_the_one_call_step_equals_the_autograd_step(case, loss):
    direct.use("direct")
    fused, ref = _net(case), _net(case)
    opt_fused, opt_ref = make_optimizer(fused, 1e-2), torch.optim.Adam(ref.parameters(), lr=1e-2)
    loss_fn, clip = LOSSES[loss], case.get("clip", 0.0)
    for x, y in _batches(case, 4, case.get("shape", (2, 21, 37))):
        ours = train_step(fused, opt_fused, x, y, loss_fn, clip)
        theirs = _autograd_step(ref, opt_ref, x, y, loss_fn, clip)
        assert ours == pytest.approx(theirs, rel=1e-5)
    assert all(p.grad is None for p in fused.parameters())  # the autograd path was not taken
    for p, q in zip(fused.parameters(), ref.parameters(), strict=True):
        assert _close(p.detach(), q.detach(), 1e-5)
        mine, adam = opt_fused.state[p], opt_ref.state[q]
        assert float(mine["step"]) == float(adam["step"]) == 4.0
        assert mine["exp_avg"].stride() == p.stride()
        for key in ("exp_avg", "exp_avg_sq"):
            assert _close(mine[key], adam[key], 1e-4)
    for layer, mask in case.get("frozen", ()):  # frozen and disabled masks did not move
        assert torch.equal(fused.layers[layer].weight[mask], _net(case).layers[layer].weight[mask])
    for layer, mask in case.get("off", ()):
        assert torch.equal(fused.layers[layer].weight[mask], _net(case).layers[layer].weight[mask])


@needs_kernels
def test_a_learning_rate_change_between_steps_is_used():
    case = CASES["thesis 5/5/1"]
    direct.use("direct")
    fused, ref = _net(case), _net(case)
    opt_fused, opt_ref = make_optimizer(fused, 1e-2), torch.optim.Adam(ref.parameters(), lr=1e-2)
    for i, (x, y) in enumerate(_batches(case, 3)):
        for opt in (opt_fused, opt_ref):
            opt.param_groups[0]["lr"] = 1e-2 / (i + 1)
        train_step(fused, opt_fused, x, y, LOSSES["f1"])
        _autograd_step(ref, opt_ref, x, y, LOSSES["f1"], 0.0)
    for p, q in zip(fused.parameters(), ref.parameters(), strict=True):
        assert _close(p.detach(), q.detach(), 1e-5)


@needs_kernels
def test_a_parameter_whose_memory_is_replaced_is_updated_where_it_now_lives():
    """``p.data = …`` (as Module.to does) keeps the parameter object and moves its memory: the
    next step updates the new memory, and a new layout (its moments no longer match it) takes
    the autograd path; both end where autograd's steps end."""
    case = CASES["masks off and frozen"]
    direct.use("direct")
    fused, ref = _net(case), _net(case)
    opt_fused, opt_ref = make_optimizer(fused, 1e-2), torch.optim.Adam(ref.parameters(), lr=1e-2)
    kept = []  # the replaced memory stays allocated: a stale pointer fails the test, not pytest
    changes = (lambda w: w.detach().clone(),  # the same layout, new memory
               lambda w: w.detach().contiguous())  # channels_last → NCHW
    for i, (x, y) in enumerate(_batches(case, 3)):
        if i:
            for net in (fused, ref):
                weight = net.layers[0].weight
                kept.append(weight.data)
                weight.data = changes[i - 1](weight)
        before = fused.layers[0].weight.detach().clone()
        train_step(fused, opt_fused, x, y, LOSSES["mae"])
        _autograd_step(ref, opt_ref, x, y, LOSSES["mae"], 0.0)
        assert not torch.equal(fused.layers[0].weight.detach(), before)
        for p, q in zip(fused.parameters(), ref.parameters(), strict=True):
            assert _close(p.detach(), q.detach(), 1e-5)
    assert fused.layers[0].weight.is_contiguous()


def _uncovered():
    """(what, model, optimizer, x, y, loss) the one-call step must leave to autograd."""
    case = CASES["thesis 5/5/1"]
    x, y = _batches(case, 1)[0]

    def adam(model, **kw):
        return torch.optim.Adam(model.parameters(), lr=1e-2, **kw)

    m = _net(case)
    yield "SGD", m, torch.optim.SGD(m.parameters(), lr=1e-2), x, y, LOSSES["mae"]
    m = _net(case)
    yield "weight decay", m, adam(m, weight_decay=1e-4), x, y, LOSSES["mae"]
    m = _net(case)
    yield "amsgrad", m, adam(m, amsgrad=True), x, y, LOSSES["mae"]
    m = _net(case)
    yield "another loss", m, adam(m), x, y, lambda p, t: (p - t).abs().max()
    m = _net(case)
    m.layers[1].weight.register_hook(lambda g: g * 2)
    yield "a gradient hook on a weight", m, adam(m), x, y, LOSSES["mae"]
    m = _net(case)
    opt = adam(m)
    opt.register_step_pre_hook(lambda *a: None)
    yield "an optimizer hook", m, opt, x, y, LOSSES["mae"]
    m = _net(case)
    yield "float64 target", m, adam(m), x, y.double(), LOSSES["mae"]
    m = _net(case)
    yield "strided target rows", m, adam(m), x, y.transpose(2, 3).contiguous().transpose(2, 3), \
        LOSSES["mae"]
    m = _net(case)
    yield "two parameter groups", m, torch.optim.Adam(
        [{"params": list(m.parameters())[:2]}, {"params": list(m.parameters())[2:]}]), x, y, \
        LOSSES["mae"]


@needs_kernels
@pytest.mark.parametrize("what", [c[0] for c in _uncovered()])
def test_what_it_does_not_cover_is_left_to_autograd_untouched(what):
    direct.use("direct")
    _, model, optimizer, x, y, loss_fn = next(c for c in _uncovered() if c[0] == what)
    before = copy.deepcopy(model.state_dict())
    assert not direct_step.applicable(model, optimizer, x, y, loss_fn)
    assert direct_step.train_step(model, optimizer, x, y, loss_fn) is None
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not optimizer.state
    train_step(model, optimizer, x, y, loss_fn)  # the autograd path: gradients are left behind
    assert all(p.grad is not None for p in model.parameters())


@needs_kernels
def test_on_torch_convolutions_it_does_not_run():
    case = CASES["thesis 5/5/1"]
    model = _net(case)
    x, y = _batches(case, 1)[0]
    direct.use("torch")
    assert direct_step.train_step(model, make_optimizer(model, 1e-2), x, y, LOSSES["f1"]) is None


@needs_kernels
def test_one_call_steps_repeat_bit_for_bit_and_resume_exactly_from_a_saved_state():
    direct.use("direct")
    case = CASES["masks off and frozen"]
    batches = _batches(case, 6, shape=(3, 19, 40))
    device = torch.device("cpu")

    def state():
        return new_state(_net(case), 1e-2, 0, device)

    def run(st, part):
        return [train_step(st.model, st.optimizer, x, y, LOSSES["f1"]) for x, y in part]

    a, b = state(), state()
    losses_a = run(a, batches)
    assert run(b, batches) == losses_a
    c = state()
    run(c, batches[:3])
    saved = copy.deepcopy(c.to_dict())  # a checkpoint: NCHW moments, new tensors
    resumed = TrainState.from_dict(saved, device)
    assert run(resumed, batches[3:]) == losses_a[3:]
    for name, value in a.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name])
    for p, q in zip(a.model.parameters(), resumed.model.parameters(), strict=True):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a.optimizer.state[p][key], resumed.optimizer.state[q][key])


@needs_kernels
def test_a_state_it_wrote_continues_on_pytorch_s_adam():
    """The optimizer state holds an ordinary Adam's entries: the autograd path takes over."""
    direct.use("direct")
    case = CASES["thesis 5/5/1"]
    batches = _batches(case, 4)
    fused, ref = _net(case), _net(case)
    opt_fused, opt_ref = make_optimizer(fused, 1e-2), torch.optim.Adam(ref.parameters(), lr=1e-2)
    for x, y in batches[:2]:
        train_step(fused, opt_fused, x, y, LOSSES["mse"])
        _autograd_step(ref, opt_ref, x, y, LOSSES["mse"], 0.0)
    for x, y in batches[2:]:
        _autograd_step(fused, opt_fused, x, y, LOSSES["mse"], 0.0)
        _autograd_step(ref, opt_ref, x, y, LOSSES["mse"], 0.0)
    for p, q in zip(fused.parameters(), ref.parameters(), strict=True):
        assert _close(p.detach(), q.detach(), 1e-5)


def test_a_copied_network_keeps_its_frozen_masks_frozen():
    model = _net(CASES["masks off and frozen"])
    twin = copy.deepcopy(model)
    direct.use("torch")
    twin(torch.rand(1, 1, 12, 12)).sum().backward()
    assert not twin.layers[0].weight.grad[2].any() and twin.layers[0].bias.grad[2] == 0
    assert twin.layers[0].weight.grad[0].any()
    assert len(twin.layers[0].weight._backward_hooks) == 1


@needs_kernels
def test_a_training_run_takes_the_one_call_step(image_folder, tmp_path):
    """selfscale.train.train on --conv direct: gradients never land on the parameters."""
    from selfscale.config import RunConfig
    from selfscale.run import prepare_data, resolve_config
    from selfscale.train import TrainSpec, train

    cfg = resolve_config(RunConfig.from_dict({
        "task": {"name": "sobel"}, "data": {"data": str(image_folder), "batch": 2,
                                            "train_crop": 16, "crop": 16,
                                            "cache_dir": str(tmp_path / "cache")},
        "model": {"widths": [2, 1]}, "train": {"steps": 3, "eval_every": 3}}))
    data = prepare_data(cfg)
    direct.use("direct")
    st = new_state(to_device(FCN((2, 1), 5, 1), torch.device("cpu")), 1e-3, 0,
                   torch.device("cpu"))
    train(st, data.train, data.eval, TrainSpec.from_config(cfg, torch.device("cpu")),
          until_step=3)
    assert st.step == 3 and all(p.grad is None for p in st.model.parameters())
    assert float(st.optimizer.state[st.model.layers[0].weight]["step"]) == 3.0
    assert np.isfinite(st.history[-1]["loss"])


def test_a_copy_of_a_network_without_gradients_can_be_made():
    model = _net(CASES["thesis 5/5/1"]).requires_grad_(False)
    twin = copy.deepcopy(model)
    assert not twin.layers[0].weight._backward_hooks
    assert torch.equal(twin.layers[0].weight, model.layers[0].weight)


def _image_set():
    from selfscale.data import ImageSet

    gen = np.random.default_rng(2)
    inputs = [gen.random((40, 52), dtype=np.float32), gen.random((33, 30), dtype=np.float32)]
    return ImageSet(["a", "b"], inputs, [np.sqrt(x) for x in inputs])


def _steps_one_by_one(st, images, rng, lrs, loss_fn, clip):
    """What train_steps replaces: a batch of sample_batch, the learning rate, train_step."""
    from selfscale.crops import sample_batch
    from selfscale.train import as_input

    losses = []
    for lr in lrs:
        x, y = sample_batch(images, rng, 3, 24, True)
        st.optimizer.param_groups[0]["lr"] = lr
        cpu = torch.device("cpu")
        losses.append(train_step(st.model, st.optimizer, as_input(x, cpu), as_input(y, cpu),
                                 loss_fn, clip))
    return losses


@needs_kernels
@pytest.mark.parametrize("helper", [True, False])
def test_steps_in_one_call_equal_the_steps_one_by_one(helper):
    """train_steps samples its own batches: the same losses, weights, Adam state, learning rate
    and generator state, bit for bit, as sample_batch and train_step step by step; in calls
    split anywhere, and with the next batch copied on the helper thread or not."""
    from selfscale.crops import BatchStream

    direct.use("direct")
    case = {**CASES["masks off and frozen"], "clip": 0.3}
    device = torch.device("cpu")
    lrs = [1e-2 * 0.9 ** i for i in range(9)]
    ref, ours = (new_state(_net(case), 1e-2, 0, device) for _ in range(2))
    images, rng_ref, rng = _image_set(), np.random.default_rng(3), np.random.default_rng(3)
    want = _steps_one_by_one(ref, images, rng_ref, lrs, LOSSES["f1"], 0.3)
    got = []
    with BatchStream(images, rng, 3, 24, True, helper=helper) as batches:
        for part in (lrs[:4], lrs[4:5], lrs[5:]):
            got += direct_step.train_steps(ours.model, ours.optimizer, batches, part, len(part),
                                           LOSSES["f1"], 0.3)
    assert got == want and len(set(got)) == len(got)
    assert rng.bit_generator.state == rng_ref.bit_generator.state
    assert ours.optimizer.param_groups[0]["lr"] == lrs[-1]
    for p, q in zip(ours.model.parameters(), ref.model.parameters(), strict=True):
        assert torch.equal(p, q)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(ours.optimizer.state[p][key], ref.optimizer.state[q][key])


@needs_kernels
def test_steps_in_one_call_stop_at_a_non_finite_loss_with_the_generator_where_it_diverged():
    """A NaN weight: the first loss is NaN, one step is done, and the generator has drawn one
    batch (the one after it, drawn ahead for the helper, is undone)."""
    from selfscale.crops import BatchStream, sample_batch

    direct.use("direct")
    st = new_state(_net(CASES["thesis 5/5/1"]), 1e-2, 0, torch.device("cpu"))
    with torch.no_grad():
        st.model.layers[1].weight[0, 0, 0, 0] = float("nan")
    images, rng, ref = _image_set(), np.random.default_rng(4), np.random.default_rng(4)
    with BatchStream(images, rng, 3, 24, True) as batches:
        losses = direct_step.train_steps(st.model, st.optimizer, batches, None, 5, LOSSES["f1"])
    assert len(losses) == 1 and np.isnan(losses[0])
    sample_batch(images, ref, 3, 24, True)
    assert rng.bit_generator.state == ref.bit_generator.state
    assert float(st.optimizer.state[st.model.layers[0].weight]["step"]) == 1.0


def test_steps_in_one_call_leave_what_they_do_not_run_to_the_caller():
    """Too many steps for one call, PyTorch's convolutions, or no kernels: None, nothing done."""
    from selfscale.crops import BatchStream

    st = new_state(_net(CASES["thesis 5/5/1"]), 1e-2, 0, torch.device("cpu"))
    before = copy.deepcopy(st.model.state_dict())
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    direct.use("torch")
    with BatchStream(_image_set(), rng, 3, 24, False) as batches:
        assert direct_step.train_steps(st.model, st.optimizer, batches, None, 2,
                                       LOSSES["f1"]) is None
        if direct.library() is not None:
            direct.use("direct")
            assert direct_step.train_steps(st.model, st.optimizer, batches, None,
                                           direct_step.STEPS_PER_CALL + 1, LOSSES["f1"]) is None
    assert rng.bit_generator.state == state and not st.optimizer.state
    for name, value in st.model.state_dict().items():
        assert torch.equal(value, before[name])


def test_steps_per_call_keep_a_call_short_for_large_batches_and_wide_networks():
    """Forward MACs per call ≤ MACS_PER_CALL, at most STEPS_PER_CALL, at least one step."""
    full, narrow = FCN((5, 5, 1), 5, 1), FCN((5, 5, 1), 5, 1)
    for layer, mask in ((0, 1), (0, 2), (0, 3), (0, 4), (1, 1), (1, 2), (1, 3), (1, 4)):
        narrow.set_enabled(layer, mask, False)  # 1/1/1: 75 MACs a pixel, against 875
    assert direct_step.steps_per_call(full, 3, 64) == 64
    assert direct_step.steps_per_call(full, 12, 64) == 10**9 // (12 * 64 * 64 * 875) == 23
    assert direct_step.steps_per_call(full, 3, 256) == 5
    assert direct_step.steps_per_call(full, 12, 512) == 1
    assert direct_step.steps_per_call(narrow, 12, 64) == 64
    assert direct_step.steps_per_call(narrow, 12, 256) == 10**9 // (12 * 256 * 256 * 75) == 16
