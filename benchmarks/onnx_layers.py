"""What one convolution layer costs in ONNX Runtime, by its channels: why the compact network's
speed-up there follows the input channels, not the multiply-accumulates.

Every layer of the benchmark's full network (5/5/1) and of its compact one (3/2/1), 5×5 kernels,
runs alone as a one-node ONNX model on ``--images`` images of ``--side``² in three forms:

* ``conv``: a ``Conv`` node, run as ``selfscale.compact.onnx_session`` runs a file (the NCHWc
  layout pass off);
* ``conv-nchwc``: the same file with onnxruntime's default optimizers (the NCHWc pass pads
  the channels to the vector width);
* ``conv-transpose``: the same layer written as a ``ConvTranspose`` with the kernel flipped and
  its channel axes swapped (the same values, checked): onnxruntime multiplies first and folds
  the columns back, so its work follows the output channels instead.

The forms run in alternating rounds, each keeping its best (as ``speed.py`` does); the table gives
each network's time per form, and its speed-up against the MAC reduction and against the
reduction of input channels × kernel² (what an unfolding convolution copies per pixel).

    python benchmarks/onnx_layers.py --out runs/onnx-layers.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

KERNEL = 5
NETWORKS = {"full": (5, 5, 1), "compact": (3, 2, 1)}
FORMS = ("conv", "conv-nchwc", "conv-transpose")
FORM_ATOL = 1e-4


def layers_of(widths: tuple[int, ...], in_channels: int = 1) -> list[tuple[int, int]]:
    """(input channels, output channels) of each layer."""
    ins = (in_channels, *widths[:-1])
    return list(zip(ins, widths))


def unfolded_per_pixel(layers: list[tuple[int, int]], kernel: int = KERNEL) -> int:
    """Floats an unfolding (im2col) convolution copies per output pixel: input channels × k²."""
    return sum(i * kernel * kernel for i, _ in layers)


def transposed_weight(weight: np.ndarray) -> np.ndarray:
    """The ``ConvTranspose`` weight (in, out, k, k) that computes the stride-1 ``Conv`` with
    ``weight`` (out, in, k, k) and the same padding: channel axes swapped, kernel flipped."""
    return np.ascontiguousarray(weight.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])


def layer_model(weight: np.ndarray, bias: np.ndarray, transpose: bool) -> bytes:
    """A one-node ONNX model (opset 17): input ``x`` (N, in, H, W) → output ``y``."""
    from onnx import TensorProto, helper, numpy_helper

    cout, cin, k, _ = weight.shape
    w = transposed_weight(weight) if transpose else weight
    node = helper.make_node("ConvTranspose" if transpose else "Conv", ["x", "w", "b"], ["y"],
                            kernel_shape=[k, k], pads=[k // 2] * 4)
    graph = helper.make_graph(
        [node], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                        [None, cin, None, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, cout, None, None])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def sessions(cin: int, cout: int, rng: np.random.Generator, threads: int) -> dict[str, Any]:
    """The three forms of one layer with the same random weights."""
    from selfscale.compact import onnx_session

    weight = rng.normal(0, 0.1, (cout, cin, KERNEL, KERNEL)).astype(np.float32)
    bias = rng.normal(0, 0.1, cout).astype(np.float32)
    conv, transposed = layer_model(weight, bias, False), layer_model(weight, bias, True)
    return {"conv": onnx_session(conv, threads=threads),
            "conv-nchwc": onnx_session(conv, threads=threads, defaults=True),
            "conv-transpose": onnx_session(transposed, threads=threads)}


def max_form_diff(forms: dict[str, Any], x: np.ndarray) -> float:
    """The largest difference of any form's output from the ``conv`` form's."""
    ref = forms["conv"].run(None, {"x": x})[0]
    return max(float(np.abs(s.run(None, {"x": x})[0] - ref).max()) for s in forms.values())


def best_seconds(fns: dict[str, Any], repeats: int) -> dict[str, float]:
    """Each function's best wall time over ``repeats`` alternating rounds."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def measure(images: int, side: int, repeats: int, threads: int, seed: int = 0) -> dict[str, Any]:
    from selfscale.model import macs_per_pixel

    rng = np.random.default_rng(seed)
    shapes = sorted({pair for w in NETWORKS.values() for pair in layers_of(w)})
    inputs = {c: rng.random((images, c, side, side), dtype=np.float32) for c, _ in shapes}
    fns, check = {}, rng.random((1, 1, 2 * KERNEL + 3, 2 * KERNEL + 1), dtype=np.float32)
    diffs = {}
    for cin, cout in shapes:
        forms = sessions(cin, cout, rng, threads)
        diffs[f"{cin}->{cout}"] = max_form_diff(forms, np.repeat(check, cin, axis=1))
        for form, sess in forms.items():
            fns[(cin, cout, form)] = (lambda s=sess, x=inputs[cin]: s.run(None, {"x": x}))
    if max(diffs.values()) > FORM_ATOL:  # a form that computes something else times nothing
        raise RuntimeError(f"the forms of a layer differ by more than {FORM_ATOL:g}: {diffs}")
    best = best_seconds(fns, repeats)
    layers = {f"{i}->{o}": {form: best[(i, o, form)] for form in FORMS} for i, o in shapes}
    nets: dict[str, Any] = {}
    for name, widths in NETWORKS.items():
        ls = layers_of(widths)
        nets[name] = {"widths": list(widths), "macs_per_pixel": macs_per_pixel(widths, KERNEL),
                      "unfolded_per_pixel": unfolded_per_pixel(ls),
                      "seconds": {form: sum(best[(i, o, form)] for i, o in ls) for form in FORMS}}
    full, small = nets["full"], nets["compact"]
    return {"images": images, "side": side, "repeats": repeats, "threads": threads,
            "layer_seconds": layers, "form_max_abs_diff": diffs, "networks": nets,
            "mac_reduction": full["macs_per_pixel"] / small["macs_per_pixel"],
            "unfolded_reduction": full["unfolded_per_pixel"] / small["unfolded_per_pixel"],
            "speedup": {form: full["seconds"][form] / small["seconds"][form] for form in FORMS}}


def table(r: dict[str, Any]) -> str:
    lines = [f"one layer alone, {r['images']}×{r['side']}², best of {r['repeats']} (ms):",
             "| layer | " + " | ".join(FORMS) + " |", "|---" * (len(FORMS) + 1) + "|"]
    for layer, secs in r["layer_seconds"].items():
        lines.append(f"| {layer} | " + " | ".join(f"{secs[f] * 1e3:.1f}" for f in FORMS) + " |")
    lines += ["", ("| form | full 5/5/1 ms | compact 3/2/1 ms | speed-up | / MAC reduction "
                   f"{r['mac_reduction']:.2f} | / unfolded reduction "
                   f"{r['unfolded_reduction']:.2f} |"),
              "|---|---|---|---|---|---|"]
    for f in FORMS:
        up = r["speedup"][f]
        lines.append(f"| {f} | {r['networks']['full']['seconds'][f] * 1e3:.1f} | "
                     f"{r['networks']['compact']['seconds'][f] * 1e3:.1f} | {up:.2f} | "
                     f"{up / r['mac_reduction']:.2f} | {up / r['unfolded_reduction']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4, help="images per run (default 4)")
    p.add_argument("--side", type=int, default=512, help="image side (default 512)")
    p.add_argument("--repeats", type=int, default=5, help="alternating rounds (default 5)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--out", type=Path, help="write the numbers to this JSON file")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    args = p.parse_args(argv)
    for name in ("images", "side", "repeats", "threads"):
        if getattr(args, name) < 1:
            print(f"onnx_layers.py: error: --{name}: must be at least 1, got "
                  f"{getattr(args, name)}", file=sys.stderr)
            return 2
    if args.out is not None and args.out.exists() and not args.force:
        print(f"onnx_layers.py: error: --out: {args.out} already exists; use --force to "
              "overwrite it", file=sys.stderr)
        return 2
    if args.out is not None:  # before the run, not after it
        from speed import out_folder_ready

        try:
            out_folder_ready(args.out)
        except ValueError as exc:
            print(f"onnx_layers.py: error: {exc}", file=sys.stderr)
            return 2
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        print("onnx_layers.py: error: needs the onnx extra: pip install 'selfscale[onnx]'",
              file=sys.stderr)
        return 2
    result = measure(args.images, args.side, args.repeats, args.threads)
    print(table(result))
    if args.out is not None:
        from selfscale.checkpoint import atomic_write_text

        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
