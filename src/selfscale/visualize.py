"""Pictures (thesis 3.2): masks in red (negative) and green (positive), and side-by-side previews.

Mask picture: one row per layer, one tile per mask; a tile shows the mask's kernels for every
input channel side by side, colour intensity = |weight| / (max |weight| of the layer). Disabled
masks are drawn dark grey with a red cross, so the picture doubles as the mask matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from selfscale.model import FCN

BACKGROUND = (32, 32, 32)
DISABLED = (70, 70, 70)
LABEL = (230, 230, 230)


def signed_rgb(values: np.ndarray, scale: float) -> np.ndarray:
    """Signed values → RGB uint8: negative red, positive green, intensity |v| / scale."""
    v = np.clip(values / (scale if scale > 0 else 1.0), -1.0, 1.0)
    rgb = np.zeros((*v.shape, 3), np.uint8)
    rgb[..., 0] = np.rint(np.clip(-v, 0, 1) * 255)
    rgb[..., 1] = np.rint(np.clip(v, 0, 1) * 255)
    return rgb


def mask_picture(model: FCN, cell: int = 10, gap: int = 6) -> Image.Image:
    """All masks of the network as a picture (see module docstring)."""
    k = model.kernel
    rows = []
    for layer in model.layers:
        w = layer.weight.detach().cpu().numpy()
        scale = float(np.abs(w).max()) or 1.0
        tiles = []
        for m in range(w.shape[0]):
            kernels = [np.kron(signed_rgb(w[m, c], scale), np.ones((cell, cell, 1), np.uint8))
                       for c in range(w.shape[1])]
            sep = np.full((k * cell, 2, 3), BACKGROUND, np.uint8)
            tile = np.concatenate([x for kern in kernels for x in (kern, sep)][:-1], axis=1)
            if not bool(layer.enabled[m]):
                tile = _crossed(np.full_like(tile, DISABLED))
            tiles.append(tile)
        rows.append(tiles)
    width = max(sum(t.shape[1] for t in tiles) + gap * (len(tiles) + 1) for tiles in rows) + 60
    height = sum(k * cell + gap * 2 + 12 for _ in rows) + gap
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = gap
    for i, tiles in enumerate(rows):
        draw.text((4, y + k * cell // 2), f"L{i + 1}", fill=LABEL)
        x = 40
        for m, tile in enumerate(tiles):
            canvas.paste(Image.fromarray(tile), (x, y + 12))
            draw.text((x, y), f"{m + 1}", fill=LABEL)
            x += tile.shape[1] + gap
        y += k * cell + gap * 2 + 12
    return canvas


def _crossed(tile: np.ndarray) -> np.ndarray:
    h, w = tile.shape[:2]
    out = tile.copy()
    for t in np.linspace(0, 1, max(h, w) * 2):
        y, x = int(t * (h - 1)), int(t * (w - 1))
        out[y, x] = (200, 40, 40)
        out[y, w - 1 - x] = (200, 40, 40)
    return out


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
