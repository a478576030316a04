"""Finding image files and decoding them, damaged or not, into grayscale float arrays in [0, 1].

Every file goes through :func:`load_gray`, which either returns a correct 2-D float32 array or
raises :class:`BadImage` with a short, stable ``reason``. It never prints and never substitutes
data: Pillow's ``LOAD_TRUNCATED_IMAGES`` stays off and a decompression-bomb warning is an error.

Conversion rules (the value of one output pixel, before the final cast to float32):

- ``1``, ``L``: the 8-bit value / 255 (so ``1`` gives exactly 0 or 1).
- ``RGB`` and every colour mode Pillow converts to RGB (``CMYK`` by Pillow's naive formula without
  ICC profiles, ``YCbCr``, ``HSV``, ``RGBX``, premultiplied ``RGBa``): ITU-R BT.601 luma
  ``(0.299 R + 0.587 G + 0.114 B) / 255`` in float64, as MATLAB ``rgb2gray`` and TensorFlow
  ``rgb_to_grayscale`` compute it.
- Alpha (``LA``, ``La``, ``RGBA``, ``PA``, palettes with transparency) is dropped: the colour
  channels are used as stored, not composited on any background.
- ``P`` (palette): looked up to RGB(A) first, then as above.
- ``I;16``, ``I;16L``, ``I;16B``, ``I;16N``: the unsigned 16-bit value / 65535.
- ``I`` (32-bit integer storage): divided by the maximum of the integer type the file declares
  (TIFF BitsPerSample/SampleFormat; 65535 for PNG and PPM/PGM, whose ``I`` holds 16-bit data;
  otherwise 2**31 - 1); negative values clip to 0.
- ``F`` (float): NaN becomes 0, then values are clipped to [0, 1] (no rescaling).
- ``LAB`` and anything else: rejected as ``unsupported-mode``.

Only the first frame of a multi-frame file is used; the EXIF orientation is applied.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from selfscale.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
"""File name endings (compared case-insensitively) that :func:`find_images` picks up."""

LUMA_BT601 = (0.299, 0.587, 0.114)
"""Weights of R, G and B in the ITU-R BT.601 luma used for every colour image."""

REASONS = ("empty", "not-an-image", "truncated", "unreadable", "decompression-bomb",
           "unsupported-mode", "too-small", "size-mismatch", "no-target")
"""Every ``BadImage.reason``; the last three are decided by :mod:`selfscale.data`."""

_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_RGB_MODES = ("RGB", "RGBX", "RGBa", "CMYK", "YCbCr", "HSV")
_ALPHA_MODES = ("RGBA", "PA", "P")
_I_AS_UINT16_FORMATS = ("PNG", "PPM")


class BadImage(Exception):
    """A file that cannot be used; ``reason`` is one of :data:`REASONS`, ``str()`` the details."""

    def __init__(self, reason: str, message: str, path: Path | None = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"reason must be one of {REASONS}, got {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.path = path


def find_images(root: Path) -> list[Path]:
    """All image files under ``root`` (recursively), sorted by their path relative to ``root``.

    Files and folders whose name starts with a dot are skipped; symbolic links to folders are
    followed once each (a link cycle is not walked twice). Works on flat folders, on nested ones
    and on the VOC2012 layout (``root/JPEGImages/*.jpg``).
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"image folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"not a folder: {root}")
    found: list[tuple[str, Path]] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            path = Path(dirpath) / name
            found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


def load_gray(path: Path) -> np.ndarray:
    """Decode ``path`` into a 2-D float32 array in [0, 1] (rules in the module docstring).

    Raises :class:`BadImage` with reason ``empty`` (zero bytes), ``not-an-image`` (Pillow does not
    recognise it), ``decompression-bomb`` (more pixels than ``Image.MAX_IMAGE_PIXELS``),
    ``truncated`` (decoding ran out of data), ``unreadable`` (any other I/O or decoding error) or
    ``unsupported-mode``. Other warnings Pillow emits while decoding (e.g. corrupt EXIF) are
    silenced: the pixels either decode completely or the file is rejected.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImage("empty", f"{path}: file is empty (0 bytes)", path)
    except OSError as exc:
        raise BadImage("unreadable", f"{path}: cannot read: {exc.strerror or exc}", path) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                im.load()
                int_max = _int_max(im)  # read before exif_transpose, whose copy loses the format
                return _to_gray(ImageOps.exif_transpose(im), path, int_max)
        except BadImage:
            raise
        except UnidentifiedImageError:
            raise BadImage("not-an-image", f"{path}: not an image Pillow can read", path) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise BadImage("decompression-bomb", f"{path}: {exc}", path) from None
        except (OSError, ValueError, EOFError, SyntaxError, IndexError, TypeError) as exc:
            detail = str(exc) or type(exc).__name__
            reason = "truncated" if "truncated" in detail.lower() else "unreadable"
            raise BadImage(reason, f"{path}: {detail}", path) from None


def _to_gray(im: Image.Image, path: Path, int_max: float) -> np.ndarray:
    mode = im.mode
    if mode in ("1", "L"):
        gray = np.asarray(im.convert("L"), dtype=np.float64) / 255.0
    elif mode in ("LA", "La"):
        la = np.asarray(im.convert("LA"), dtype=np.float64)  # La: premultiplied, undone first
        gray = la[..., 0] / 255.0
    elif mode in _UINT16_MODES:
        gray = np.asarray(im).astype(np.float64) / 65535.0
    elif mode == "I":
        gray = np.clip(np.asarray(im).astype(np.float64) / int_max, 0.0, 1.0)
    elif mode == "F":
        values = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        gray = np.clip(values, 0.0, 1.0)
    elif mode in _RGB_MODES or mode in _ALPHA_MODES:
        rgb = np.asarray(im.convert("RGBA" if mode in _ALPHA_MODES else "RGB"), dtype=np.float64)
        r, g, b = LUMA_BT601
        gray = (r * rgb[..., 0] + g * rgb[..., 1] + b * rgb[..., 2]) / 255.0
    else:
        raise BadImage("unsupported-mode", f"{path}: unsupported image mode {mode!r}", path)
    return np.ascontiguousarray(gray, dtype=np.float32)


def _int_max(im: Image.Image) -> float:
    """Full-scale value of a Pillow ``I`` (int32) image, from what the file format declares."""
    if im.format in _I_AS_UINT16_FORMATS:
        return 65535.0
    tags = getattr(im, "tag_v2", None)
    if im.format == "TIFF" and tags is not None:
        bits = tags.get(258, 32)
        bits = bits[0] if isinstance(bits, tuple) else bits
        sample_format = tags.get(339, 1)
        sample_format = sample_format[0] if isinstance(sample_format, tuple) else sample_format
        signed = sample_format == 2
        return float(2 ** (int(bits) - int(signed)) - 1)
    return float(2**31 - 1)
