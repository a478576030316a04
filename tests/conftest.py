"""Shared fixtures: tiny synthetic image folders (good, broken, rectangles), an isolated cache."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TINY_SHAPE = (40, 48)
"""(H, W) of the synthetic images: small enough to keep tests fast, larger than crop 16."""


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", choices=("cpu", "cuda"),
                     help="where tests/test_device.py runs the command line (default cpu)")


@pytest.fixture(scope="session")
def device(request) -> str:
    """The device of `pytest --device`; a CUDA request without a GPU skips those tests."""
    import torch

    name = request.config.getoption("--device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda: no CUDA device here")
    return name


@pytest.fixture(autouse=True)
def _cpu_unless_asked(request, monkeypatch):
    """Every test runs on the CPU, on a GPU machine too: ``--device auto`` (the default) finds no
    CUDA device, in this process and in the processes a test starts. Only the tests that take
    the ``device`` fixture under ``pytest --device cuda`` see the GPU."""
    import torch

    if "device" in request.fixturenames and request.config.getoption("--device") == "cuda":
        return
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """No test writes to ~/.cache: the default data cache points into the test's tmp_path."""
    monkeypatch.setenv("SELFSCALE_CACHE", str(tmp_path / "selfscale-cache"))


@pytest.fixture(autouse=True)
def _torch_conv():
    """Each test starts on PyTorch's convolutions; a run it starts, loads or trains switches the
    process to that run's --conv (selfscale.direct.use), as in a command."""
    from selfscale import direct

    direct.use("torch")
    yield
    direct.use("torch")


def gradient(shape=TINY_SHAPE, phase: int = 0) -> np.ndarray:
    """uint8 diagonal ramp with a bright rectangle: edges in both directions."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    img = (yy * 3 + xx * 2 + phase * 17) % 200
    img[h // 4:h // 2, w // 3:(2 * w) // 3] = 250
    return img.astype(np.uint8)


def write_png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose IHDR declares ``width``×``height`` (valid CRCs) but holds no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def _noise_bytes(fmt: str, seed: int = 0) -> bytes:
    import io

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Six 40×48 images in nested folders: four grayscale PNGs, one RGB PNG, one BMP."""
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    (root / "b" / "c").mkdir(parents=True)
    for i, rel in enumerate(["a/one.png", "a/two.png", "b/three.png", "b/c/four.png"]):
        Image.fromarray(gradient(phase=i)).save(root / rel)
    rgb = np.stack([gradient(phase=4), gradient(phase=5), gradient(phase=6)], axis=-1)
    Image.fromarray(rgb).save(root / "five.png")
    Image.fromarray(gradient(phase=7)).save(root / "six.bmp")
    return root


@pytest.fixture(scope="session")
def rect_folder(tmp_path_factory):
    """Factory of folders ``im0.png`` … ``im{n-1}.png``: 8-bit grayscale, each a ``size``
    rectangle of brightness ``level`` (in [0, 1]) on black at a top-left corner drawn from
    ``default_rng(seed).integers(*corner, size=2)``, plus a left-to-right ramp from 0 to
    ``ramp``. The same arguments write byte-identical files; usable from module-scoped fixtures."""
    def make(name: str, n: int, shape: tuple[int, int], *, seed: int, corner: tuple[int, int],
             size: tuple[int, int], level: float, ramp: float = 0.0) -> Path:
        root = tmp_path_factory.mktemp(name)
        rng = np.random.default_rng(seed)
        for i in range(n):
            img = np.zeros(shape, np.float32)
            y, x = rng.integers(*corner, size=2)
            img[y:y + size[0], x:x + size[1]] = level
            if ramp:
                img += np.linspace(0, ramp, shape[1])[None, :]
            Image.fromarray((img * 255).astype(np.uint8)).save(root / f"im{i}.png")
        return root

    return make


@dataclass
class BrokenFolder:
    root: Path
    expected: dict[str, str | None]
    """Name relative to root → the skip reason at crop 16, or None when it must load."""


@pytest.fixture
def broken_folder(tmp_path) -> BrokenFolder:
    """Good images next to broken ones, each with the outcome expected at crop 16."""
    root = tmp_path / "broken"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    expected: dict[str, str | None] = {}

    def add(name: str, outcome: str | None) -> Path:
        expected[name] = outcome
        return root / name

    Image.fromarray(gradient()).save(add("good_gray.png", None))
    Image.fromarray(np.stack([gradient()] * 3, axis=-1)).save(add("good_rgb.jpg", None))
    Image.fromarray(gradient(phase=2)).save(add("sub/upper.PNG", None))
    add("empty.png", "empty").write_bytes(b"")
    add("notes.png", "not-an-image").write_text("this is not an image\n")
    jpeg = _noise_bytes("JPEG")
    add("cut.jpg", "truncated").write_bytes(jpeg[: len(jpeg) // 2])
    png = _noise_bytes("PNG")
    add("cut.png", "truncated").write_bytes(png[: len(png) // 2])
    Image.fromarray(gradient((10, 12))).save(add("tiny.png", "too-small"))
    sixteen = (gradient().astype(np.uint32) * 257).astype(np.uint16)
    sixteen[0, :3] = (0, 32768, 65535)
    Image.fromarray(sixteen).save(add("sixteen.png", None))
    Image.fromarray(gradient()).convert("P").save(add("palette.png", None))
    rgba = np.dstack([np.stack([gradient()] * 3, axis=-1), np.zeros(TINY_SHAPE, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(add("rgba.png", None))
    Image.new("CMYK", TINY_SHAPE[::-1], (0, 0, 0, 0)).save(add("cmyk.jpg", None))
    Image.fromarray(gradient() > 100).save(add("onebit.png", None))
    write_png_header_only(add("bomb.png", "decompression-bomb"), 30000, 30000)
    Image.fromarray(gradient()).save(root / ".hidden.png")          # hidden: not found
    Image.fromarray(gradient()).save(root / ".hidden" / "x.png")    # in a hidden folder
    (root / "readme.txt").write_text("not an image suffix: not found\n")
    return BrokenFolder(root, expected)


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def load_benchmark():
    """Import a script of benchmarks/ as a module (its folder on sys.path, so one script can
    import another); everything is undone when the test module ends."""
    import importlib.util
    import sys

    loaded: list[str] = []
    sys.path.insert(0, str(BENCHMARKS))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        loaded.append(name)
        spec.loader.exec_module(module)
        return module

    yield load
    sys.path.remove(str(BENCHMARKS))
    for name in loaded:
        sys.modules.pop(name, None)
