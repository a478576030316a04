"""The FCN: shapes, parameter counts, initialization and the enabled / frozen switches."""

import torch
import torch.nn.functional as F

from selfscale.model import (FCN, active_parameter_count, build_model, macs_per_pixel,
                             parameter_count, receptive_field)



def test_thesis_network_has_886_parameters():
    """3 layers 1→5→5→1 of 5×5 masks with biases: 130 + 630 + 126 = 886 (REFERENCE.md)."""
    model = FCN((5, 5, 1), 5)
    assert sum(p.numel() for p in model.parameters()) == 886
    assert parameter_count((5, 5, 1), 5) == 886
    assert macs_per_pixel((5, 5, 1), 5) == 25 * (5 + 25 + 5)
    assert receptive_field(3, 5) == 13


def test_output_has_input_size_and_is_non_negative():
    """Same padding keeps H×W for odd and even sizes; ReLU on the output."""
    model = build_model((5, 5, 1), 5, 1, 0.05, seed=0)
    for h, w in [(17, 23), (32, 32), (1, 1)]:
        out = model(torch.rand(2, 1, h, w))
        assert out.shape == (2, 1, h, w)
        assert (out >= 0).all()


def test_forward_equals_plain_convolutions():
    """With every switch on, the network is conv → ReLU three times (reference computation)."""
    model = build_model((3, 2, 1), 3, 1, 0.5, seed=1)
    x = torch.rand(1, 1, 9, 9)
    ref = x
    for layer in model.layers:
        ref = F.relu(F.conv2d(ref, layer.weight, layer.bias, padding=1))
    assert torch.equal(model(x), ref)


def test_truncated_normal_init_is_seeded_and_bounded():
    """Values within ±2·std, std close to the truncated normal's (≈0.88·σ), same seed same weights."""
    a = build_model((64, 64, 1), 5, 1, 0.05, seed=3)
    b = build_model((64, 64, 1), 5, 1, 0.05, seed=3)
    c = build_model((64, 64, 1), 5, 1, 0.05, seed=4)
    wa = torch.cat([p.detach().flatten() for p in a.parameters()])
    assert torch.equal(wa, torch.cat([p.flatten() for p in b.parameters()]))
    assert not torch.equal(wa, torch.cat([p.flatten() for p in c.parameters()]))
    assert wa.abs().max() <= 0.1
    assert abs(float(wa.mean())) < 0.002
    # std of N(0,1) truncated to [-2, 2] is 0.8796
    assert abs(float(wa.std()) - 0.05 * 0.8796) < 0.001


def test_disabled_mask_outputs_exactly_zero():
    """A disabled mask's channel is exactly 0 for any input, and enabling restores it."""
    model = build_model((5, 5, 1), 5, 1, 0.05, seed=0)
    x = torch.rand(2, 1, 16, 16) * 10
    conv = model.layers[0]
    before = F.relu(conv(x))
    model.set_enabled(0, 2, False)
    off = F.relu(conv(x))
    assert torch.count_nonzero(off[:, 2]) == 0
    assert torch.equal(off[:, [0, 1, 3, 4]], before[:, [0, 1, 3, 4]])
    # large negative input cannot make it nonzero either (bias is switched off too)
    assert torch.count_nonzero(conv(-x)[:, 2]) == 0
    model.set_enabled(0, 2, True)
    assert torch.equal(F.relu(conv(x)), before)
    assert model.active_widths() == (5, 5, 1)


def test_disabled_mask_equals_network_without_it():
    """Disabling masks = removing them and the next layer's matching input channels."""
    model = build_model((4, 3, 1), 5, 1, 0.2, seed=5)
    model.set_enabled(0, 1, False)
    model.set_enabled(1, 2, False)
    x = torch.rand(1, 1, 12, 12)
    keep0, keep1 = [0, 2, 3], [0, 1]
    l0, l1, l2 = model.layers
    h = F.relu(F.conv2d(x, l0.weight[keep0], l0.bias[keep0], padding=2))
    h = F.relu(F.conv2d(h, l1.weight[keep1][:, keep0], l1.bias[keep1], padding=2))
    ref = F.relu(F.conv2d(h, l2.weight[:, keep1], l2.bias, padding=2))
    torch.testing.assert_close(model(x), ref, rtol=1e-6, atol=1e-7)
    assert active_parameter_count(model) == (1 * 3 * 25 + 3) + (3 * 2 * 25 + 2) + (2 * 25 + 1)


def test_frozen_mask_unchanged_after_steps_while_others_change():
    """Freezing stops updates of that mask only; it still produces output."""
    model = build_model((5, 5, 1), 5, 1, 0.3, seed=0)  # wide init: every mask is alive
    model.set_frozen(0, 1, True)
    model.set_frozen(1, 4, True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.rand(3, 1, 20, 20), torch.rand(3, 1, 20, 20)
    for _ in range(3):
        opt.zero_grad()
        (model(x) - y).abs().mean().backward()
        opt.step()
    w0, b0 = model.layers[0].weight, model.layers[0].bias
    assert torch.equal(w0[1], before["layers.0.weight"][1])
    assert torch.equal(b0[1], before["layers.0.bias"][1])
    assert torch.equal(model.layers[1].weight[4], before["layers.1.weight"][4])
    assert not torch.equal(w0[0], before["layers.0.weight"][0])
    assert not torch.equal(model.layers[1].weight[:4], before["layers.1.weight"][:4])
    assert torch.count_nonzero(F.relu(model.layers[0](x))[:, 1]) > 0


def test_switches_travel_with_state_dict():
    """enabled/frozen are buffers: saved and loaded with the weights."""
    model = build_model((5, 5, 1), 5, 1, 0.05, seed=0)
    model.set_enabled(1, 3, False)
    model.set_frozen(0, 0, True)
    other = FCN((5, 5, 1), 5)
    other.load_state_dict(model.state_dict())
    assert other.enabled_masks()[1] == [True, True, True, False, True]
    assert other.frozen_masks()[0] == [True, False, False, False, False]


def test_reinit_mask_changes_only_that_mask():
    """Re-initialization redraws one mask from the truncated normal and leaves the rest."""
    model = build_model((5, 5, 1), 5, 1, 0.05, seed=0)
    before = model.layers[1].weight.detach().clone()
    model.reinit_mask(1, 2, 0.05, torch.Generator().manual_seed(9))
    after = model.layers[1].weight.detach()
    assert not torch.equal(after[2], before[2])
    assert torch.equal(after[[0, 1, 3, 4]], before[[0, 1, 3, 4]])
    assert after[2].abs().max() <= 0.1


def test_trunc_normal_fills_in_memory_order_of_the_target():
    """A channels_last weight gets the values an in-place draw into it would get (so re-draws
    of a model already in channels_last reproduce the published runs)."""
    from torch import nn

    from selfscale.model import trunc_normal_

    target = torch.empty(5, 5, 5, 5).contiguous(memory_format=torch.channels_last)
    trunc_normal_(target, 0.05, torch.Generator().manual_seed(4))
    ref = torch.empty(5, 5, 5, 5).contiguous(memory_format=torch.channels_last)
    nn.init.trunc_normal_(ref, 0.0, 0.05, -0.1, 0.1, generator=torch.Generator().manual_seed(4))
    assert torch.equal(target, ref)
    plain = torch.empty(5, 5, 5, 5)
    trunc_normal_(plain, 0.05, torch.Generator().manual_seed(4))
    assert not torch.equal(plain, target)  # the layout matters, hence this test


def test_switch_changes_after_a_forward_take_effect():
    """The all-on fast path is cached per switch tensor and version: setting a switch, loading a
    state dict or moving the module must all be seen by the next forward and backward."""
    import torch

    from selfscale.model import FCN

    torch.manual_seed(0)
    net = FCN((3, 2, 1), kernel=3)
    for p in net.parameters():
        torch.nn.init.uniform_(p, 0.1, 0.5)  # all positive: every mask is alive
    x = torch.rand(1, 1, 8, 8)
    full = net(x)
    net.set_enabled(0, 1, False)
    off = net(x)
    assert not torch.equal(full, off)
    other = FCN((3, 2, 1), kernel=3)
    other.load_state_dict(net.state_dict())
    net.set_enabled(0, 1, True)
    assert torch.equal(net(x), full)
    net.load_state_dict(other.state_dict())  # in-place copy into the buffers
    assert torch.equal(net(x), off)
    net.set_frozen(1, 0, True)
    net(x).sum().backward()
    assert torch.count_nonzero(net.layers[1].weight.grad[0]) == 0
    assert torch.count_nonzero(net.layers[1].weight.grad[1]) > 0
