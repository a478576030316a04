"""Running a trained network on whole image files and writing its outputs as 8-bit PNGs.

Output scaling (thesis 2.3): the network ends in ReLU, so its output is already non-negative and
no shift is needed; targets live in [0, 1], so the output is clipped to [0, 1], multiplied by 255
and rounded to the nearest integer (``uint8``). The network is fully convolutional: every output
has the height and width of its input.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from selfscale.errors import DataError
from selfscale.images import BadImage, find_images, load_gray


def to_uint8(output: np.ndarray) -> np.ndarray:
    """Network output (≥ 0, nominally [0, 1]) → uint8 image: clip to [0, 1], ×255, round."""
    return np.rint(np.clip(output, 0.0, 1.0) * 255.0).astype(np.uint8)


def collect_inputs(inputs: list[Path]) -> list[tuple[Path, Path]]:
    """(source file, output path relative to --out) for every input file or image in a folder.

    A file ``x.jpg`` becomes ``x.png``; a folder's images keep their relative sub-paths. Two
    inputs that would write the same output name are a usage error.
    """
    pairs: list[tuple[Path, Path]] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            pairs += [(p, p.relative_to(item).with_suffix(".png")) for p in find_images(item)]
        elif item.is_file():
            pairs.append((item, Path(item.name).with_suffix(".png")))
        else:
            raise DataError(f"input not found: {item}")
    seen: dict[Path, Path] = {}
    for src, rel in pairs:
        if rel in seen:
            raise DataError(f"inputs {seen[rel]} and {src} would both be written as {rel}; "
                            "predict them into different --out folders")
        seen[rel] = src
    if not pairs:
        raise DataError("no input images found in: " + ", ".join(map(str, inputs)))
    return pairs


@dataclass
class PredictReport:
    written: list[Path] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)


@torch.no_grad()
def predict_files(model: torch.nn.Module, inputs: list[Path], out_dir: Path,
                  device: torch.device, *, overwrite: bool = False) -> PredictReport:
    """Predict every input image and write ``out_dir/<name>.png``; existing outputs are never
    replaced unless ``overwrite``. Unreadable images are skipped with one counted warning."""
    pairs = collect_inputs(inputs)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out: {out_dir} is a file; give a folder for the output images")
    if not overwrite:
        clash = [out_dir / rel for _, rel in pairs if (out_dir / rel).exists()]
        if clash:
            raise DataError(f"--out: {clash[0]} already exists ({len(clash)} output file(s) "
                            "would be replaced); use --overwrite or another --out")
    report = PredictReport()
    first_bad: dict[str, Path] = {}
    model.eval()
    for src, rel in pairs:
        try:
            image = load_gray(src)
        except BadImage as exc:
            report.skipped[exc.reason] += 1
            first_bad.setdefault(exc.reason, src)
            continue
        x = torch.from_numpy(image)[None, None].to(device)
        x = x.contiguous(memory_format=torch.channels_last)
        out = model(x)[0, 0].float().cpu().numpy()
        dest = out_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(to_uint8(out)).save(dest)
        report.written.append(dest)
    if report.skipped:
        detail = ", ".join(f"{n} {reason} (first: {first_bad[reason]})"
                           for reason, n in sorted(report.skipped.items()))
        warnings.warn(f"skipped {sum(report.skipped.values())} of {len(pairs)} inputs: {detail}",
                      stacklevel=2)
    if not report.written:
        raise DataError(f"none of the {len(pairs)} inputs could be read")
    return report
