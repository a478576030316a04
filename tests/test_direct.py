"""The direct convolution (--conv direct) against PyTorch's, and how a run chooses and keeps it."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from selfscale import direct
from selfscale.cli import main
from selfscale.errors import ConfigError
from selfscale.model import FCN

needs_kernels = pytest.mark.skipif(direct.library() is None,
                                   reason=f"direct kernels not built: {direct.failure()}")


def _net(widths, kernel=5, in_channels=1, off=(), seed=0) -> FCN:
    torch.manual_seed(seed)
    model = FCN(widths, kernel, in_channels)
    for layer in model.layers:  # positive biases: most ReLUs pass, so every path is exercised
        torch.nn.init.uniform_(layer.bias, 0.0, 0.2)
    for layer, mask in off:
        model.set_enabled(layer, mask, False)
    return model


def _pass(model: FCN, x: torch.Tensor, target: torch.Tensor, conv: str):
    """Output and every parameter's gradient of an MSE loss, on ``conv``'s convolution."""
    direct.use(conv)
    model.zero_grad(set_to_none=True)
    out = model(x)
    ((out - target) ** 2).mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 2e-5) -> bool:
    return bool((a - b).abs().max() <= rel * max(float(b.abs().max()), 1e-12))


CASES = {
    "thesis 5/5/1": {"widths": (5, 5, 1), "shape": (3, 1, 40, 37)},
    "masks off in two layers": {"widths": (5, 5, 1), "off": ((0, 1), (0, 4), (1, 3)),
                                "shape": (2, 1, 21, 70)},
    "strips in groups and alone": {"widths": (1, 5, 1), "shape": (1, 1, 6, 49)},
    "two strip groups and one more": {"widths": (5, 1), "shape": (2, 1, 7, 80)},
    "k=3, four layers, 9 wide": {"widths": (3, 7, 9, 1), "kernel": 3, "shape": (2, 1, 17, 33)},
    "k=7, RGB input": {"widths": (4, 1), "kernel": 7, "in_channels": 3, "shape": (1, 3, 19, 16)},
    "k=7, strips shifted in registers": {"widths": (3, 2, 1), "kernel": 7, "shape": (1, 1, 11, 45)},
    "narrower than one strip": {"widths": (2, 2, 1), "shape": (2, 1, 9, 5)},
    "a whole layer off": {"widths": (3, 2, 1), "off": ((1, 0), (1, 1)), "shape": (1, 1, 12, 20)},
    "k=1": {"widths": (4, 1), "kernel": 1, "shape": (2, 1, 9, 18)},
    "k=9, generic kernel size": {"widths": (3, 2, 1), "kernel": 9, "shape": (1, 1, 13, 21)},
    "16 wide, masks in blocks": {"widths": (16, 16, 1), "kernel": 3, "off": ((1, 9),),
                                 "shape": (1, 1, 10, 34)},
}


@needs_kernels
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_output_and_gradients_equal_torch_convolutions(case):
    model = _net(case["widths"], case.get("kernel", 5), case.get("in_channels", 1),
                 case.get("off", ()))
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(case["shape"], generator=gen)
    target = torch.rand(x.shape[0], 1, *x.shape[2:], generator=gen)
    ref_out, ref_grads = _pass(model, x, target, "torch")
    out, grads = _pass(model, x, target, "direct")
    assert out.shape == ref_out.shape and _close(out, ref_out)
    for g, ref in zip(grads, ref_grads, strict=True):
        assert _close(g, ref)
    with torch.inference_mode():
        assert _close(model(x), ref_out)


@needs_kernels
@pytest.mark.parametrize("name", ["masks off in two layers", "k=3, four layers, 9 wide",
                                  "k=7, RGB input", "a whole layer off"])
def test_every_layer_s_output_is_what_the_forward_pass_computes(name):
    """model.layer_outputs (mask activity, pictures) takes the forward pass's path: on the
    kernels each output equals PyTorch's to rounding, the last is model(x) to the bit, and a
    disabled mask's plane is zero."""
    from selfscale.model import layer_outputs, mask_activity

    case = CASES[name]
    model = _net(case["widths"], case.get("kernel", 5), case.get("in_channels", 1),
                 case.get("off", ()))
    x = torch.rand(case["shape"], generator=torch.Generator().manual_seed(2))
    direct.use("torch")
    ref = layer_outputs(model, x)
    direct.use("direct")
    got = layer_outputs(model, x)
    assert [t.shape for t in got] == [t.shape for t in ref]
    assert all(_close(a, b) for a, b in zip(got, ref, strict=True))
    with torch.no_grad():
        assert torch.equal(got[-1], model(x))
    for layer, mask in case.get("off", ()):
        assert not got[layer][:, mask].any()
    active = mask_activity(model, [x])
    assert all(torch.equal(a, (t > 0).double().mean(dim=(0, 2, 3)))
               for a, t in zip(active, got, strict=True))


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("band", [1, 5, 8])
def test_inference_in_row_bands_gives_the_bits_of_the_layer_by_layer_pass(monkeypatch, band,
                                                                           threads):
    """Without gradient, model(x) runs every layer on one band of rows of one image at a time,
    recomputing the rows a band's neighbours need: the same bits as a layer-by-layer pass, for
    bands of one row, bands not dividing the height, one layer, masks off, RGB, kernels 1-9."""
    monkeypatch.setattr(direct, "BAND_ROWS", band)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    cases = [*CASES.values(), {"widths": (1,), "shape": (2, 1, 13, 21)},
             {"widths": (2, 3, 1), "kernel": 3, "off": ((1, 2),), "shape": (3, 1, 23, 40)},
             # 600 wide: the bands' short calls stream the 2 -> 1 layer, the whole pass's 130
             # rows take two rows a pass
             {"widths": (3, 2, 1), "shape": (1, 1, 130, 600)}]
    for case in cases:
        model = _net(case["widths"], case.get("kernel", 5), case.get("in_channels", 1),
                     case.get("off", ()))
        x = torch.rand(case["shape"], generator=torch.Generator().manual_seed(3))
        direct.use("direct")
        weights, biases, actives = direct._gated(model)
        for given in (x, x.transpose(2, 3).contiguous().transpose(2, 3)):  # rows read by stride
            with torch.no_grad():
                ref = direct._stack_forward(given, [w.contiguous() for w in weights],
                                            [b.contiguous() for b in biases], actives)[-1]
                assert torch.equal(model(given), ref), case


@needs_kernels
def test_an_expanded_output_gradient_is_read_through_its_strides():
    model = _net((3, 2, 1))
    x = torch.rand(2, 1, 19, 23)
    grads = {}
    for conv in ("torch", "direct"):
        direct.use(conv)
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()  # the output's gradient is one value expanded (stride 0)
        grads[conv] = [p.grad.clone() for p in model.parameters()]
    assert all(_close(a, b) for a, b in zip(grads["direct"], grads["torch"], strict=True))


@needs_kernels
def test_disabled_masks_get_zero_gradient_and_their_weights_change_nothing():
    model = _net((5, 5, 1), off=((0, 2), (1, 0)))
    x, target = torch.rand(2, 1, 24, 30), torch.rand(2, 1, 24, 30)
    out, grads = _pass(model, x, target, "direct")
    weight0, bias0, weight1, bias1 = grads[:4]
    assert not weight0[2].any() and bias0[2] == 0 and not weight1[0].any() and bias1[0] == 0
    assert weight1[:, 2].abs().sum() == 0  # reads the disabled layer-0 mask: always zero input
    with torch.no_grad():
        model.layers[0].weight[2] = 1e6
        model.layers[1].weight[0] = -1e6
    assert torch.equal(model(x).detach(), out)


@needs_kernels
def test_same_threads_give_bit_identical_results():
    model = _net((5, 5, 1))
    x, target = torch.rand(4, 1, 33, 47), torch.rand(4, 1, 33, 47)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            first, again = _pass(model, x, target, "direct"), _pass(model, x, target, "direct")
            assert torch.equal(first[0], again[0])
            assert all(torch.equal(a, b) for a, b in zip(first[1], again[1], strict=True))
    finally:
        torch.set_num_threads(before)


def _padded_rand(n, c, h, wd, k, gen):
    buf = direct._padded(n, c, h, wd, k)
    direct._pad_copy(torch.randn(n, c, h, wd, generator=gen), buf, None, k // 2)
    return buf


@needs_kernels
@pytest.mark.parametrize("kernel", (3, 5))
@pytest.mark.parametrize("threads", (1, 2))
@pytest.mark.parametrize("wd", (37, 70, 300, 600))
def test_channels_run_down_the_rows_give_the_bits_of_the_row_passes(kernel, threads, wd):
    """On narrow images 1-2 output channels run down the rows (ss_conv), and one channel's
    weight gradient does (ss_wgrad); every sum keeps its order, so a channel's bits are those it
    gets among three, two rows a pass, or in a block of three channels. With K = 5 one channel
    takes a ring of registers for each whole block of 32 columns (one block and a tail of 5
    at 37 wide, two and a tail of 6 at 70), two channels for each of 16; K = 5 streams 300 and
    600 wide too (19 rows: a call as short as an inference band), K = 3 not."""
    direct.library()
    gen = torch.Generator().manual_seed(3)
    n, cin, h, k = 2, 3, 19, kernel
    x, g = _padded_rand(n, cin, h, wd, k, gen), _padded_rand(n, 3, h, wd, k, gen)
    ref = _padded_rand(n, 3, h, wd, k, gen)
    w, b = torch.randn(3, cin, k, k, generator=gen), torch.randn(3, generator=gen)
    ins = torch.tensor([0, 2], dtype=torch.int32)  # input plane 1 off: two planes summed
    lib, before = direct._library, torch.get_num_threads()

    def run(outs: list[int], mode: int, transposed: bool = False):
        out = torch.full((n, 3, *x.shape[2:]), 7.0)
        src, wt = (g, w.transpose(0, 1).contiguous()) if transposed else (x, w)
        chans = torch.tensor(outs, dtype=torch.int32)
        direct._conv(src, wt, None if transposed else b, out, k // 2, ref, mode, chans,
                     ins if not transposed else torch.arange(3, dtype=torch.int32), h, wd,
                     transposed=transposed)
        gw, gb = torch.zeros(3, cin, k, k), torch.zeros(3)
        lib.ss_wgrad(x.data_ptr(), x.shape[2] * x.shape[3], x.shape[3], g.data_ptr(),
                     g.shape[2] * g.shape[3], g.shape[3], k // 2 * g.shape[3] + k // 2,
                     gw.data_ptr(), gb.data_ptr(), chans.data_ptr(), chans.numel(),
                     ins.data_ptr(), ins.numel(), n, cin, 3, h, wd, k, threads)
        return out, gw, gb

    try:
        torch.set_num_threads(threads)
        for mode, transposed in ((1, False), (0, False), (2, True)):
            out3, gw3, gb3 = run([0, 1, 2], mode, transposed)
            for outs in ([1], [0, 2]):
                out, gw, gb = run(outs, mode, transposed)
                assert torch.equal(out[:, outs], out3[:, outs])
                if len(outs) == 1:
                    assert torch.equal(gw[outs], gw3[outs]) and torch.equal(gb[outs], gb3[outs])
            assert float((out3[:, :, k // 2:k // 2 + h, k // 2:k // 2 + wd] - 7).abs().min()) > 0
    finally:
        torch.set_num_threads(before)


@needs_kernels
def test_nan_passes_through_relu_as_in_torch():
    model = _net((2, 1))
    with torch.no_grad():
        model.layers[0].weight[0, 0, 2, 2] = float("nan")
    direct.use("direct")
    out = model(torch.rand(1, 1, 8, 8))
    assert torch.isnan(out).all()


@needs_kernels
def test_torch_runs_what_the_kernels_do_not_cover():
    model = _net((5, 5, 1))
    x = torch.rand(1, 1, 16, 16)
    direct.use("direct")
    assert direct.applicable(model, x)
    assert not direct.applicable(model, x.double())
    assert not direct.applicable(model, x.clone().requires_grad_(True))  # input gradients
    assert not direct.applicable(_net((direct.MAX_WIDTH + 1, 1)), x)
    with pytest.raises(RuntimeError, match="channels"):  # torch's error, not a wild read
        model(torch.rand(1, 2, 16, 16))
    handle = model.layers[1].register_forward_hook(lambda *a: None)  # e.g. taylor's scores
    assert not direct.applicable(model, x)
    handle.remove()
    assert direct.applicable(model, x)
    assert type(model(x).grad_fn).__name__ == "_StackBackward"
    direct.use("torch")
    assert not direct.applicable(model, x)


def test_an_unknown_conv_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^--conv: must be one of auto, direct, torch, got 'x'"):
        direct.use("x")


def test_without_a_compiler_auto_falls_back_and_direct_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setattr(direct, "_library", None)
    monkeypatch.setattr(direct, "_failure", None)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    assert direct.use("auto") == "torch"
    assert "no-such-c++" in direct.failure()
    with pytest.raises(ConfigError) as err:
        direct.use("direct")
    assert str(err.value).startswith("--conv direct: the direct convolution cannot be built here")
    assert "\n" not in str(err.value) and str(err.value).endswith("use --conv torch")


@needs_kernels
def test_the_build_is_cached_per_source_and_compiler(tmp_path, monkeypatch):
    import shutil

    cxx = shutil.which("c++") or shutil.which("g++")
    first = direct._compile(cxx, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert direct._compile(cxx, tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind


@needs_kernels
def test_a_run_records_its_conv_and_later_commands_use_it(image_folder, tmp_path, capsys):
    from selfscale.run import META_FILE, load_run

    def train(name: str, *conv: str) -> None:
        assert main(["train", "--data", str(image_folder), "--steps", "2", "--crop", "16",
                     "--train-crop", "16", "--batch", "2", "--quiet", "--out",
                     str(tmp_path / name), *conv]) == 0

    train("a")  # --conv auto
    assert json.loads((tmp_path / "a" / META_FILE).read_text())["conv"] == "direct"
    assert direct.current() == "direct"
    train("b", "--conv", "torch")
    assert json.loads((tmp_path / "b" / META_FILE).read_text())["conv"] == "torch"
    assert direct.current() == "torch"
    load_run(tmp_path / "a")
    assert direct.current() == "direct"
    capsys.readouterr()
    assert main(["info", str(tmp_path / "a")]) == 0
    assert ", threads " in capsys.readouterr().out.split("conv direct")[0]
    # a run from before --conv existed trained on torch's convolutions and goes on with them
    meta = json.loads((tmp_path / "a" / META_FILE).read_text())
    del meta["conv"]
    (tmp_path / "a" / META_FILE).write_text(json.dumps(meta))
    load_run(tmp_path / "a")
    assert direct.current() == "torch"


@needs_kernels
def test_a_deep_copy_keeps_working():
    model = _net((5, 5, 1), off=((0, 0),))
    x = torch.rand(1, 1, 20, 20)
    direct.use("direct")
    twin = copy.deepcopy(model)
    assert torch.equal(twin(x), model(x))
    ref = x
    direct.use("torch")
    for layer in model.layers:
        ref = F.relu(layer(ref))
    assert _close(twin(x).detach(), ref.detach())


def test_fused_adam_on_direct_keeps_moments_in_their_parameters_layout():
    """Fused CPU Adam reads moments in memory order: moments restored in NCHW order for a
    channels_last weight (a checkpoint, a narrow copy) must be put back in the weight's layout."""
    from selfscale.train import make_optimizer, to_device

    direct.use("direct")
    model = to_device(_net((3, 2, 1)), torch.device("cpu"))  # channels_last weights
    twin = copy.deepcopy(model)
    fused = make_optimizer(model, 1e-2)
    if not fused.param_groups[0]["fused"]:
        pytest.skip("this torch has no fused CPU Adam")
    loop = torch.optim.Adam(twin.parameters(), lr=1e-2)  # the per-tensor reference
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=gen) for p in model.parameters()]

    def step(opt, net):
        for p, g in zip(net.parameters(), grads, strict=True):
            p.grad = g.clone().contiguous(memory_format=torch.channels_last) if g.dim() == 4 \
                else g.clone()
        opt.step()

    for _ in range(2):
        step(fused, model)
        step(loop, twin)
    saved = fused.state_dict()
    for entry in saved["state"].values():  # as a checkpoint or a narrow copy hands them back
        for key in ("exp_avg", "exp_avg_sq"):
            entry[key] = entry[key].contiguous()
    fused = make_optimizer(model, 1e-2)
    fused.load_state_dict(saved)
    for p in model.parameters():
        assert fused.state[p]["exp_avg"].stride() == p.stride()
    for _ in range(3):
        step(fused, model)
        step(loop, twin)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert _close(a.detach(), b.detach(), rel=1e-6)
    direct.use("torch")
    assert not make_optimizer(model, 1e-2).param_groups[0]["fused"]


@needs_kernels
def test_buffers_are_float32_whatever_torch_s_default_dtype():
    model = _net((3, 1))
    x = torch.rand(1, 1, 4, 20)
    direct.use("torch")
    ref = model(x).detach()
    direct.use("direct")
    before = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        out = model(x)
        out.sum().backward()
    finally:
        torch.set_default_dtype(before)
    assert out.dtype == torch.float32 and _close(out.detach(), ref)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


@needs_kernels
def test_a_copy_does_not_inherit_a_stale_list_of_enabled_masks():
    model = _net((3, 1), kernel=3)
    x = torch.rand(1, 1, 9, 9)
    direct.use("direct")
    model.set_enabled(0, 1, False)
    model(x)  # caches the enabled masks [0, 2]
    model.set_enabled(0, 1, True)
    twin = copy.deepcopy(model)  # its switch restarts at version 1
    assert twin.layers[0].active_indices().tolist() == [0, 1, 2]
    assert torch.equal(twin(x), model(x))


@needs_kernels
def test_hooks_even_and_large_kernels_and_second_derivatives_are_left_to_torch():
    x = torch.rand(1, 1, 12, 12)
    direct.use("direct")
    assert not direct.applicable(_net((2, 1), kernel=4), x)
    assert not direct.applicable(_net((2, 1), kernel=direct.MAX_KERNEL + 2), x)
    assert direct.applicable(_net((2, 1), kernel=direct.MAX_KERNEL), x)
    model = _net((2, 1))
    handle = model.layers[0].register_full_backward_hook(lambda *a: None)
    assert not direct.applicable(model, x)
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert not direct.applicable(model, x)
    finally:
        handle.remove()
    assert direct.applicable(model, x)
    loss = (model(x) ** 2).sum()  # its output gradient depends on the weights
    grads = torch.autograd.grad(loss, model.layers[0].weight, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grads[0].sum().backward()


@needs_kernels
def test_a_fused_state_loaded_on_torch_convolutions_still_gets_its_layouts_fixed():
    """A --conv direct run resumed where the kernels cannot be built: the per-tensor Adam is
    made, but the loaded state says fused, so the moments must be put in layout too."""
    from selfscale.train import make_optimizer, to_device

    direct.use("direct")
    model = to_device(_net((3, 1)), torch.device("cpu"))
    fused = make_optimizer(model, 1e-2)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    fused.step()
    saved = fused.state_dict()
    for entry in saved["state"].values():
        entry["exp_avg"] = entry["exp_avg"].contiguous()
    direct.use("torch")
    again = make_optimizer(model, 1e-2)
    again.load_state_dict(saved)
    assert again.param_groups[0]["fused"] == saved["param_groups"][0]["fused"]
    for p in model.parameters():
        assert again.state[p]["exp_avg"].stride() == p.stride()
