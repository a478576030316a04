"""Pictures of a network (thesis 3.2): its masks, the output of every mask, and previews.

* :func:`mask_picture` (Fig 3.1): one row per layer, one tile per mask; a tile shows the mask's
  kernels for every input channel side by side, red for negative and green for positive weights,
  intensity = |weight| / (max |weight| of the layer). A removed (disabled) mask is drawn dark grey
  with a red cross; a kernel that reads a removed mask of the layer before (an input channel that
  is always zero) is greyed out, so the picture doubles as the mask matrix.
* :func:`outputs_picture` (Fig 3.4): the input image, then one row per layer with the output
  (after its ReLU) of every mask, grey levels scaled by the layer's largest output; removed masks
  are crossed out.
* :func:`preview_grid` (Fig 3.2–3.3): rows of grayscale panels under column titles.

Every picture is a grid of tiles (:func:`tile_grid`) whose size follows from the tile sizes and
the constants below, so a picture's size tells how many tiles it holds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from selfscale.model import FCN
from selfscale.model import layer_outputs as model_layer_outputs

BACKGROUND = (32, 32, 32)
DISABLED = (70, 70, 70)
"""A removed mask's tile."""
UNUSED = (52, 52, 52)
"""A kernel that reads a removed mask of the layer before."""
CROSS = (200, 40, 40)
LABEL = (230, 230, 230)
GAP = 6
"""Pixels between tiles and around the grid."""
LABEL_H = 12
"""Height of the label line above each row of tiles."""
LEFT = 40
"""Width of the row-label column."""
CELL = 10
"""Pixels per kernel weight in :func:`mask_picture`."""
SEP = 2
"""Pixels between the kernels of one mask."""
TILE = 96
"""Side of each output tile in :func:`outputs_picture`."""


def signed_rgb(values: np.ndarray, scale: float) -> np.ndarray:
    """Signed values → RGB uint8: negative red, positive green, intensity |v| / scale."""
    v = np.clip(values / (scale if scale > 0 else 1.0), -1.0, 1.0)
    rgb = np.zeros((*v.shape, 3), np.uint8)
    rgb[..., 0] = np.rint(np.clip(-v, 0, 1) * 255)
    rgb[..., 1] = np.rint(np.clip(v, 0, 1) * 255)
    return rgb


def gray_rgb(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → grey RGB uint8."""
    g = np.rint(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


def crossed(tile: np.ndarray) -> np.ndarray:
    """A copy of an RGB tile with a red cross from corner to corner."""
    h, w = tile.shape[:2]
    out = tile.copy()
    for t in np.linspace(0, 1, max(h, w) * 2):
        y, x = int(t * (h - 1)), int(t * (w - 1))
        out[y, x] = CROSS
        out[y, w - 1 - x] = CROSS
    return out


def tile_grid(rows: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str],
              tile_labels: Sequence[Sequence[str]]) -> Image.Image:
    """RGB tiles in rows (the tiles of one row share a height) with a label left of each row and
    one above each tile. Size: width ``LEFT + max over rows of (Σ tile widths + GAP·(n + 1))``,
    height ``GAP + Σ over rows of (LABEL_H + row height + GAP)``."""
    width = LEFT + max(sum(t.shape[1] for t in r) + GAP * (len(r) + 1) for r in rows)
    height = GAP + sum(LABEL_H + r[0].shape[0] + GAP for r in rows)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = GAP
    for tiles, label, names in zip(rows, row_labels, tile_labels):
        draw.text((4, y + LABEL_H + tiles[0].shape[0] // 2 - 6), label, fill=LABEL)
        x = LEFT + GAP
        for tile, name in zip(tiles, names):
            canvas.paste(Image.fromarray(tile), (x, y + LABEL_H))
            draw.text((x, y), name, fill=LABEL)
            x += tile.shape[1] + GAP
        y += LABEL_H + tiles[0].shape[0] + GAP
    return canvas


def mask_tiles(model: FCN, cell: int = CELL) -> list[list[np.ndarray]]:
    """Per layer, one RGB tile per mask (see the module docstring)."""
    k = model.kernel
    rows, feeding = [], None
    for layer in model.layers:
        w = layer.weight.detach().cpu().float().numpy()
        scale = float(np.abs(w).max()) or 1.0
        sep = np.full((k * cell, SEP, 3), BACKGROUND, np.uint8)
        tiles = []
        for m in range(w.shape[0]):
            kernels = []
            for c in range(w.shape[1]):
                kern = np.kron(signed_rgb(w[m, c], scale), np.ones((cell, cell, 1), np.uint8))
                if feeding is not None and not feeding[c]:
                    kern = np.full_like(kern, UNUSED)
                kernels += [kern, sep]
            tile = np.concatenate(kernels[:-1], axis=1)
            if not bool(layer.enabled[m]):
                tile = crossed(np.full_like(tile, DISABLED))
            tiles.append(tile)
        rows.append(tiles)
        feeding = layer.enabled.tolist()
    return rows


def mask_picture(model: FCN, cell: int = CELL) -> Image.Image:
    """All masks of the network as one picture (Fig 3.1; see the module docstring)."""
    rows = mask_tiles(model, cell)
    return tile_grid(rows, [f"L{i + 1}" for i in range(len(rows))],
                     [[str(m + 1) for m in range(len(r))] for r in rows])


@torch.no_grad()
def layer_outputs(model: FCN, image: np.ndarray) -> list[np.ndarray]:
    """The output (after its ReLU) of every mask of every layer for a 2-D ``image`` in [0, 1]:
    per layer an array ``(masks, H, W)``. A removed mask's output is zero."""
    device = next(model.parameters()).device
    x = torch.from_numpy(np.array(image, np.float32))[None, None].to(device)
    x = x.repeat(1, model.in_channels, 1, 1)
    return [out[0].float().cpu().numpy() for out in model_layer_outputs(model, x)]


def _thumb(values: np.ndarray, side: int) -> np.ndarray:
    """A grey RGB tile of ``side``² (values in [0, 1], resized keeping nothing but the size)."""
    img = Image.fromarray(np.rint(np.clip(values, 0, 1) * 255).astype(np.uint8))
    return gray_rgb(np.asarray(img.resize((side, side), Image.Resampling.BILINEAR)) / 255.0)


def outputs_picture(model: FCN, image: np.ndarray, side: int = TILE) -> Image.Image:
    """Fig 3.4: the input, then the output of every mask of every layer (rows), each tile
    ``side``²; hidden layers scaled by the layer's largest output among its enabled masks, the
    output layer shown as it is (its values are the image the network makes)."""
    outputs = layer_outputs(model, image)
    rows, names = [[_thumb(image, side)]], [["input"]]
    last = len(outputs) - 1
    for i, (layer, out) in enumerate(zip(model.layers, outputs)):
        enabled = layer.enabled.tolist()
        top = max((float(out[m].max()) for m in range(len(out)) if enabled[m]), default=0.0)
        scale = 1.0 if i == last or top <= 0 else top
        tiles = []
        for m in range(len(out)):
            tile = _thumb(out[m] / scale, side)
            tiles.append(tile if enabled[m] else crossed(np.full_like(tile, DISABLED)))
        rows.append(tiles)
        names.append([f"{m + 1}" + ("" if enabled[m] else " removed") for m in range(len(out))])
    labels = ["in"] + [f"L{i + 1}" for i in range(len(outputs))]
    return tile_grid(rows, labels, names)


def preview_grid(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str],
                 gap: int = 4) -> Image.Image:
    """Rows of equally sized grayscale panels in [0, 1] with a title above each column."""
    h, w = rows[0][0].shape
    header = 14
    canvas = Image.new("L", (len(titles) * (w + gap) + gap, len(rows) * (h + gap) + gap + header),
                       20)
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(titles):
        draw.text((gap + j * (w + gap), 2), title, fill=235)
    for i, panels in enumerate(rows):
        for j, panel in enumerate(panels):
            img = Image.fromarray(np.rint(np.clip(panel, 0, 1) * 255).astype(np.uint8))
            canvas.paste(img, (gap + j * (w + gap), header + gap + i * (h + gap)))
    return canvas
