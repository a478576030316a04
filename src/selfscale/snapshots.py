"""Training snapshots: the network's output for a few small eval crops at chosen steps.

With ``--snapshot-every N`` a run stores, at step 0 and every N steps, the output of its network
for the centre crops (:data:`SIDE`², at most :data:`IMAGES` of them) of its first eval images, as
8-bit arrays (value ×255, clipped)::

    RUN/snapshots/crops.npz            inputs and targets of the crops (uint8), written once
    RUN/snapshots/step-00000500.npz    the output at step 500 (uint8)

Each file is written atomically. A resumed run retrains the steps since its last checkpoint
bit-identically, so a snapshot written again is the same. ``selfscale visualize`` lays them out
as input, target and output at the stored steps (thesis Fig 3.2–3.3).
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import torch

from selfscale.checkpoint import atomic_write_bytes
from selfscale.crops import center_crops
from selfscale.data import ImageSet
from selfscale.model import FCN

SNAPSHOT_DIR = "snapshots"
CROPS_FILE = "crops.npz"
SIDE = 64
"""Side of the snapshot crops (smaller when an eval image is smaller)."""
IMAGES = 4
"""At most this many eval images are snapshotted."""
_STEP = re.compile(r"^step-(\d{8,})\.npz$")


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → uint8, ×255 rounded, clipped."""
    return np.rint(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8)


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


class Snapshotter:
    """Takes the snapshots of one run (its eval crops are cut once)."""

    def __init__(self, run_dir: Path, eval_set: ImageSet, every: int) -> None:
        self.folder = Path(run_dir) / SNAPSHOT_DIR
        self.every = every
        images = eval_set[:IMAGES]
        side = min([SIDE] + [min(np.shape(x)) for x in images.inputs])
        self.inputs, targets = center_crops(images, side)
        if not (self.folder / CROPS_FILE).is_file():
            atomic_write_bytes(self.folder / CROPS_FILE,
                               _npz_bytes(inputs=to_uint8(self.inputs[:, 0]),
                                          targets=to_uint8(targets[:, 0])))

    @torch.no_grad()
    def take(self, model: FCN, step: int) -> Path:
        """Store the output of ``model`` at ``step``."""
        from selfscale.train import as_input

        device = next(model.parameters()).device
        out = model(as_input(self.inputs, device)).float().cpu().numpy()[:, 0]
        path = self.folder / f"step-{step:08d}.npz"
        atomic_write_bytes(path, _npz_bytes(output=to_uint8(out)))
        return path


def read_snapshots(run_dir: Path) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """(inputs, targets, {step: outputs}) of a run, each uint8 ``(n, side, side)``; no snapshots
    → empty arrays and an empty dict."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    if not (folder / CROPS_FILE).is_file():
        empty = np.zeros((0, 0, 0), np.uint8)
        return empty, empty, {}
    with np.load(folder / CROPS_FILE) as crops:
        inputs, targets = crops["inputs"], crops["targets"]
    steps = {}
    for path in sorted(folder.glob("step-*.npz")):
        match = _STEP.match(path.name)
        if match:
            with np.load(path) as f:
                steps[int(match.group(1))] = f["output"]
    return inputs, targets, steps
