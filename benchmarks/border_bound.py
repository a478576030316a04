"""How much the zero padding at crop borders costs on the bundled sobel eval images.

The eval crops are cut from whole images, and their targets are Sobel of the whole image,
cropped; the network, though, sees the crop alone, zero-padded. This prints:

- the exact Sobel operator applied to the zero-padded 256² crops, scored by soft F1 against the
  targets, with and without the 1-pixel border (an upper bound of what any network can score
  under this evaluation);
- for each run directory given, its network (``--stage``, default the base) scored as
  ``selfscale evaluate`` scores it (the zero-padded crop) and with context: the crop cut with a
  margin of the network's receptive-field radius from the whole image (zeros only beyond the
  image), predicted, then cropped back, so every scored pixel sees what it would see in a
  whole-image prediction.

    python benchmarks/border_bound.py [RUN_DIR ...] [--stage base|minimized]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from selfscale.config import RunConfig
from selfscale.crops import center_crops
from selfscale.data import ImageSet
from selfscale.errors import SelfscaleError
from selfscale.metrics import METRICS
from selfscale.model import FCN, receptive_field
from selfscale.run import load_run, network, prepare_data
from selfscale.tasks import sobel
from selfscale.train import evaluate


def exact_sobel_bound(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Soft F1 of the Sobel magnitude computed on the zero-padded crops ``x`` (the task's own
    operator with a constant border) against ``y``: on the whole crop and without its 1-pixel
    border."""
    pred = torch.from_numpy(np.stack([sobel(a[0], mode="constant") for a in x])[:, None])
    target = torch.from_numpy(y)
    f1 = METRICS["f1"].fn
    return float(f1(pred, target).mean()), float(f1(pred[..., 1:-1, 1:-1], target[..., 1:-1, 1:-1]).mean())


@torch.no_grad()
def scores_with_context(model: FCN, images: ImageSet, crop: int) -> dict[str, float]:
    """Mean soft F1 and UIQI of the centre crops when the network sees their surroundings up to
    its receptive-field radius (clipped at the image, where the network's own zero padding
    applies as in a whole-image prediction)."""
    margin = receptive_field(len(model.layers), model.kernel) // 2
    sums = {"f1": 0.0, "uiqi": 0.0}
    model.eval()
    for image, target in zip(images.inputs, images.targets):
        h, w = image.shape
        top, left = (h - crop) // 2, (w - crop) // 2
        t0, l0 = max(top - margin, 0), max(left - margin, 0)
        x = np.ascontiguousarray(image[t0:top + crop + margin, l0:left + crop + margin], np.float32)
        out = model(torch.from_numpy(x)[None, None]).float()
        out = out[..., top - t0:top - t0 + crop, left - l0:left - l0 + crop]
        y = torch.from_numpy(np.ascontiguousarray(target[top:top + crop, left:left + crop], np.float32))
        for name in sums:
            sums[name] += float(METRICS[name].fn(out, y[None, None]).sum())
    return {name: total / len(images) for name, total in sums.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", type=Path, help="run directories (sobel) to score")
    p.add_argument("--stage", default="base", choices=("base", "minimized"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = prepare_data(RunConfig())
    x, y = center_crops(data.eval, 256)
    whole, inner = exact_sobel_bound(x, y)
    print(f"exact Sobel on zero-padded 256² crops: soft F1 {whole:.3f}; "
          f"without the 1-pixel border {inner:.3f}")
    if args.runs:
        print("\n| run | stage | F1 (zero-padded crop) | F1 (with context) | UIQI (zero-padded crop) | UIQI (with context) |")
        print("|---|---|---|---|---|---|")
    for path in args.runs:
        try:
            run = load_run(path)
            model, stage = network(run, args.stage)
        except SelfscaleError as exc:
            print(f"border_bound.py: {path}: {exc}", file=sys.stderr)
            return 2
        crop = run.config.data.crop
        plain = evaluate(model, data.eval, crop, torch.device("cpu"))
        ctx = scores_with_context(model, data.eval, crop)
        print(f"| {path.name} | {stage} | {plain['f1']:.4f} | {ctx['f1']:.4f} | "
              f"{plain['uiqi']:.4f} | {ctx['uiqi']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
