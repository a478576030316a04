"""Tests of selfscale.images: finding files, decoding every mode, rejecting damaged files."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from PIL import Image

from selfscale.errors import DataError
from selfscale.images import IMAGE_SUFFIXES, REASONS, BadImage, find_images, load_gray


def _save(path, array, mode=None, **kwargs):
    image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    image.save(path, **kwargs)
    return path


def _tiff_int16(path, values):
    """A minimal uncompressed little-endian TIFF with signed 16-bit samples (Pillow cannot write
    one: it stores int16 arrays as 32-bit)."""
    data = np.asarray(values, "<i2")
    h, w = data.shape
    entries = [(256, w), (257, h), (258, 16), (259, 1), (262, 1), (273, None), (277, 1),
               (278, h), (279, data.nbytes), (339, 2)]  # 339 SampleFormat = 2: signed
    pixels_at = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, value in entries:
        ifd += struct.pack("<HHII", tag, 4, 1, pixels_at if value is None else value)
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + data.tobytes())
    return path


def _reason(path) -> str:
    with pytest.raises(BadImage) as info:
        load_gray(path)
    return info.value.reason


# --- find_images --------------------------------------------------------------------------------

def test_find_images_nested_sorted_skips_hidden(broken_folder):
    """Recursive, sorted by relative path, any suffix case, hidden files and folders skipped."""
    found = [p.relative_to(broken_folder.root).as_posix() for p in find_images(broken_folder.root)]
    assert found == sorted(broken_folder.expected)


def test_find_images_voc_layout(tmp_path):
    """VOC2012: root/JPEGImages/*.jpg next to annotation folders without images."""
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations" / "2007_000027.xml").write_text("<annotation/>")
    for name in ("2007_000032.jpg", "2007_000027.jpg"):
        _save(tmp_path / "JPEGImages" / name, np.zeros((8, 8), np.uint8))
    assert [p.name for p in find_images(tmp_path)] == ["2007_000027.jpg", "2007_000032.jpg"]


def test_find_images_all_suffixes_case_insensitive(tmp_path):
    """Every suffix in IMAGE_SUFFIXES is found, upper case too."""
    for i, suffix in enumerate(IMAGE_SUFFIXES):
        (tmp_path / f"f{i}{suffix.upper() if i % 2 else suffix}").write_bytes(b"x")
    assert len(find_images(tmp_path)) == len(IMAGE_SUFFIXES)


def test_find_images_follows_folder_links_once(tmp_path):
    """A linked folder is searched; a link cycle does not loop forever."""
    real = tmp_path / "real"
    real.mkdir()
    _save(real / "x.png", np.zeros((4, 4), np.uint8))
    root = tmp_path / "root"
    root.mkdir()
    (root / "linked").symlink_to(real, target_is_directory=True)
    (real / "loop").symlink_to(root, target_is_directory=True)
    assert [p.relative_to(root).as_posix() for p in find_images(root)] == ["linked/x.png"]


def test_find_images_missing_root_names_path(tmp_path):
    """A missing root or a file as root is a DataError naming the path."""
    with pytest.raises(DataError, match="not found.*nowhere"):
        find_images(tmp_path / "nowhere")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(DataError, match="not a folder.*file.png"):
        find_images(tmp_path / "file.png")


# --- known values -------------------------------------------------------------------------------

def test_gray_8bit_divides_by_255_exactly(tmp_path):
    """Every 8-bit level v loads as float32(v / 255)."""
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = load_gray(_save(tmp_path / "l.png", levels))
    assert out.dtype == np.float32 and out.shape == (16, 16) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, (levels / 255.0).astype(np.float32))


def test_rgb_uses_bt601_luma(tmp_path):
    """Red → 0.299, green → 0.587, blue → 0.114, white → 1 (ITU-R BT.601)."""
    rgb = np.zeros((1, 4, 3), np.uint8)
    rgb[0, 0, 0] = rgb[0, 1, 1] = rgb[0, 2, 2] = 255
    rgb[0, 3] = 255
    out = load_gray(_save(tmp_path / "rgb.png", rgb))
    np.testing.assert_array_equal(out[0], np.float32([0.299, 0.587, 0.114, 1.0]))


def test_rgb_matches_pillow_integer_luma(tmp_path):
    """Equivalence: Pillow's convert('L') uses the same weights, rounded to integers."""
    rng = np.random.default_rng(1)
    rgb = (rng.random((20, 30, 3)) * 255).astype(np.uint8)
    out = load_gray(_save(tmp_path / "rgb.png", rgb))
    pillow = np.asarray(Image.fromarray(rgb).convert("L"), np.float64) / 255
    assert np.abs(out - pillow).max() <= 0.5 / 255 + 1e-6


def test_16bit_png_divides_by_65535(tmp_path):
    """I;16 PNG: 65535 → 1.0, 32768 → 32768/65535, 0 → 0."""
    data = np.array([[0, 32768, 65535]], np.uint16)
    out = load_gray(_save(tmp_path / "s.png", data))
    np.testing.assert_array_equal(out, np.float32([[0.0, 32768 / 65535, 1.0]]))


def test_16bit_pgm_opened_as_mode_I_divides_by_65535(tmp_path):
    """Pillow opens a 16-bit PGM as 32-bit mode 'I'; its values are still 16-bit."""
    path = tmp_path / "s.pgm"
    _save(path, np.array([[0, 32768, 65535]], np.uint16))
    assert Image.open(path).mode == "I"
    np.testing.assert_array_equal(load_gray(path), np.float32([[0.0, 32768 / 65535, 1.0]]))


def test_signed_and_32bit_tiff_use_their_type_range(tmp_path):
    """int16 TIFF: divided by 32767; int32 TIFF: by 2**31 − 1; negatives clip to 0."""
    path = _tiff_int16(tmp_path / "a.tif", [[-5, 0, 32767]])
    assert Image.open(path).mode == "I"  # Pillow widens it; the tags say 16-bit signed
    int16 = load_gray(path)
    np.testing.assert_array_equal(int16, np.float32([[0.0, 0.0, 1.0]]))
    int32 = load_gray(_save(tmp_path / "b.tif", np.array([[-5, 2**30, 2**31 - 1]], np.int32)))
    np.testing.assert_allclose(int32, [[0.0, 2**30 / (2**31 - 1), 1.0]], rtol=1e-7)


def test_float_tiff_is_clipped_not_rescaled(tmp_path):
    """Mode F: values kept, clipped to [0, 1]; NaN becomes 0."""
    data = np.array([[-0.5, 0.25, 2.0, np.nan]], np.float32)
    out = load_gray(_save(tmp_path / "f.tif", data))
    np.testing.assert_array_equal(out, np.float32([[0.0, 0.25, 1.0, 0.0]]))


def test_palette_and_transparent_palette_use_colours(tmp_path):
    """P images are looked up in their palette (index 1 → red → 0.299), transparency ignored."""
    im = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_gray(tmp_path / "p.png"), np.float32([[0.0, 0.299]]))
    im.info["transparency"] = 1
    im.save(tmp_path / "pt.png", transparency=1)
    assert Image.open(tmp_path / "pt.png").info.get("transparency") == 1
    np.testing.assert_array_equal(load_gray(tmp_path / "pt.png"), np.float32([[0.0, 0.299]]))


def test_alpha_is_dropped_not_composited(tmp_path):
    """A fully transparent red RGBA pixel still loads as 0.299; LA keeps its L channel."""
    rgba = np.array([[[255, 0, 0, 0], [0, 0, 255, 255]]], np.uint8)
    np.testing.assert_array_equal(load_gray(_save(tmp_path / "a.png", rgba, "RGBA")),
                                  np.float32([[0.299, 0.114]]))
    la = np.array([[[100, 0], [200, 255]]], np.uint8)
    np.testing.assert_array_equal(load_gray(_save(tmp_path / "la.png", la, "LA")),
                                  np.float32([[100 / 255, 200 / 255]]))


def test_cmyk_jpeg_and_one_bit(tmp_path):
    """CMYK white → 1 and full black ink → 0 (JPEG: within 1/255); mode 1 → exactly 0 and 1."""
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(tmp_path / "w.jpg")
    Image.new("CMYK", (8, 8), (0, 0, 0, 255)).save(tmp_path / "k.jpg")
    np.testing.assert_allclose(load_gray(tmp_path / "w.jpg"), 1.0, atol=1 / 255)
    np.testing.assert_allclose(load_gray(tmp_path / "k.jpg"), 0.0, atol=1 / 255)
    bits = np.array([[True, False, True]])
    np.testing.assert_array_equal(load_gray(_save(tmp_path / "b.png", bits)), [[1.0, 0.0, 1.0]])


def test_exif_orientation_is_applied(tmp_path):
    """Orientation 6 (rotate 90° clockwise to display): a 2×3 image loads as 3×2, rotated."""
    exif = Image.Exif()
    exif[0x0112] = 6
    data = (np.arange(6, dtype=np.uint8).reshape(2, 3) * 40)
    out = load_gray(_save(tmp_path / "o.png", data, exif=exif))
    np.testing.assert_array_equal(out, (np.rot90(data, -1) / 255).astype(np.float32))


def test_multiframe_uses_first_frame(tmp_path):
    """A two-page TIFF loads its first page."""
    first = Image.fromarray(np.full((4, 5), 10, np.uint8))
    first.save(tmp_path / "m.tif", save_all=True,
               append_images=[Image.fromarray(np.full((4, 5), 200, np.uint8))])
    np.testing.assert_array_equal(load_gray(tmp_path / "m.tif"), np.float32(10 / 255))


# --- rejection ----------------------------------------------------------------------------------

def test_broken_files_have_stable_reasons(broken_folder):
    """Each broken file of the fixture is rejected for its reason; the rest load in [0, 1]."""
    for name, expected in broken_folder.expected.items():
        path = broken_folder.root / name
        if expected in (None, "too-small"):
            out = load_gray(path)
            assert out.ndim == 2 and out.dtype == np.float32, name
            assert 0.0 <= out.min() and out.max() <= 1.0, name
        else:
            assert _reason(path) == expected, name


def test_truncated_jpeg_and_png_are_rejected_at_decoding(broken_folder):
    """Pillow opens both lazily without complaint; load_gray forces decoding and says why."""
    for name in ("cut.jpg", "cut.png"):
        Image.open(broken_folder.root / name)  # opening alone succeeds
        with pytest.raises(BadImage, match="truncated") as info:
            load_gray(broken_folder.root / name)
        assert info.value.reason == "truncated" and name in str(info.value)


def test_decompression_bomb_warning_is_an_error(tmp_path, monkeypatch):
    """Above MAX_IMAGE_PIXELS (a warning in Pillow) the file is rejected, not decoded."""
    path = _save(tmp_path / "big.png", np.zeros((40, 48), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1920 px: warning range (< 2×)
    assert _reason(path) == "decompression-bomb"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # > 2×: Pillow's own error
    assert _reason(path) == "decompression-bomb"


def test_unsupported_mode_and_unreadable(tmp_path):
    """LAB is refused rather than guessed; a missing file or a folder is unreadable."""
    Image.new("LAB", (4, 4), (50, 0, 0)).save(tmp_path / "lab.tif")
    assert _reason(tmp_path / "lab.tif") == "unsupported-mode"
    assert _reason(tmp_path / "missing.png") == "unreadable"
    (tmp_path / "dir.png").mkdir()
    assert _reason(tmp_path / "dir.png") == "unreadable"


def test_bad_image_carries_reason_and_message(tmp_path):
    """BadImage: a stable reason key, a message naming the file, only known reasons."""
    (tmp_path / "e.png").write_bytes(b"")
    with pytest.raises(BadImage) as info:
        load_gray(tmp_path / "e.png")
    assert info.value.reason == "empty" and "e.png" in str(info.value)
    assert info.value.reason in REASONS
    with pytest.raises(ValueError, match="reason must be one of"):
        BadImage("broken", "x")
