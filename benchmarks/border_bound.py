"""How much the zero padding at crop borders costs: the exact Sobel operator, applied to the
zero-padded 256² eval crops the network sees, scored by soft F1 against the targets (Sobel of
the whole image, cropped), with and without the 1-pixel border.

    python benchmarks/border_bound.py
"""
import numpy as np, scipy.ndimage as ndi, torch
from selfscale.config import RunConfig
from selfscale.run import prepare_data
from selfscale.crops import center_crops
from selfscale.metrics import METRICS
x, y = center_crops(prepare_data(RunConfig()).eval, 256)      # inputs, sobel targets (whole image, cropped)
k = np.outer([1, 2, 1], [1, 0, -1]) / 4                       # skimage's sobel kernels, zero padding
gx = np.stack([ndi.correlate(a[0], k, mode="constant") for a in x])
gy = np.stack([ndi.correlate(a[0], k.T, mode="constant") for a in x])
pred = np.sqrt((gx ** 2 + gy ** 2) / 2)[:, None].astype(np.float32)
f1 = METRICS["f1"].fn(torch.from_numpy(pred), torch.from_numpy(y)).mean()
inner = METRICS["f1"].fn(torch.from_numpy(pred[..., 1:-1, 1:-1]), torch.from_numpy(y[..., 1:-1, 1:-1])).mean()
print(f"exact Sobel on zero-padded 256² crops: soft F1 {float(f1):.3f}; without the 1-pixel border {float(inner):.3f}")
