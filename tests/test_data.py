"""Tests of selfscale.data, .cache and .crops: building cached data sets, skipping bad files,
splits, crops, batches."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from selfscale import cache as cache_mod
from selfscale import crops, direct
from selfscale.cache import CACHE_FORMAT, cache_folder
from selfscale.config import DataConfig
from selfscale.crops import center_crops, require_crop_fits, sample_batch
from selfscale.data import (BUNDLED_EVAL, BUNDLED_TRAIN, ImageSet, SkippedImagesWarning,
                            bundled_image_paths, load_datasets, load_eval_set, split_by_file)
from selfscale.errors import ConfigError, DataError
from selfscale.images import load_gray
from selfscale.tasks import get_task, make_target, resolve_params

needs_kernels = pytest.mark.skipif(direct.library() is None,
                                   reason=f"direct kernels not built: {direct.failure()}")

SOBEL = get_task("sobel")
SOBEL_PARAMS = resolve_params(SOBEL, {})


def counting(task):
    """``task`` with an operator that counts its calls in ``.calls``."""
    calls = []

    def fn(image, **params):
        calls.append(image.shape)
        return task.fn(image, **params)

    counted = dataclasses.replace(task, fn=fn)
    return counted, calls


def cfg(tmp_path, **kwargs) -> DataConfig:
    kwargs.setdefault("crop", 16)
    kwargs.setdefault("cache_dir", tmp_path / "cache")
    return DataConfig(**{"train_crop": None, **kwargs})


def entries(tmp_path):
    return sorted((tmp_path / "cache" / f"arrays-v{CACHE_FORMAT}").glob("*.npy"))


@contextlib.contextmanager
def no_warnings():
    """Any warning inside is an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# --- building -----------------------------------------------------------------------------------

def test_inputs_and_targets_are_whole_images(tmp_path, image_folder):
    """Inputs equal load_gray of the file; targets equal the operator on the WHOLE image."""
    sets = load_datasets(cfg(tmp_path, data=image_folder), SOBEL, SOBEL_PARAMS)
    assert sets.source == str(image_folder)
    for images in (sets.train, sets.eval):
        for name, x, y in zip(images.names, images.inputs, images.targets):
            whole = load_gray(image_folder / name)
            assert isinstance(x, np.memmap) and x.dtype == np.float32
            np.testing.assert_array_equal(x, whole)
            np.testing.assert_array_equal(y, make_target(SOBEL, whole, SOBEL_PARAMS))
    assert sorted(sets.train.names + sets.eval.names) == sorted(
        p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*.*"))
    assert sets.report.n_found == sets.report.n_used == 6 and not sets.report.skipped


def test_broken_folder_skips_exactly_the_bad_files(tmp_path, broken_folder, image_folder):
    """Good and convertible files load; each broken one is skipped for its reason; one warning."""
    with pytest.warns(SkippedImagesWarning) as record:
        sets = load_datasets(cfg(tmp_path, data=broken_folder.root, eval_data=image_folder),
                             SOBEL, SOBEL_PARAMS)
    good = sorted(n for n, r in broken_folder.expected.items() if r is None)
    assert sets.train.names == good
    expected = {}
    for reason in broken_folder.expected.values():
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    assert sets.report.skipped == expected
    assert sets.report.first_skipped["truncated"] == "cut.jpg"
    assert len(record) == 1
    message = str(record[0].message)
    n_bad = sum(expected.values())
    assert message.startswith(f"skipped {n_bad} of {len(broken_folder.expected) + 6} images: ")
    assert "2 truncated (first: cut.jpg)" in message and "1 too-small (first: tiny.png)" in message
    sixteen = sets.train.inputs[sets.train.names.index("sixteen.png")]
    np.testing.assert_array_equal(sixteen[0, :3], np.float32([0, 32768 / 65535, 1.0]))


def test_load_eval_set_folder_and_warning(tmp_path, broken_folder):
    """Every usable image of the folder is an eval image; the skips warn once."""
    n_bad = sum(r is not None for r in broken_folder.expected.values())
    with pytest.warns(SkippedImagesWarning,
                      match=f"skipped {n_bad} of {len(broken_folder.expected)} images") as record:
        images = load_eval_set(broken_folder.root, cfg(tmp_path), SOBEL, SOBEL_PARAMS)
    assert len(record) == 1
    assert images.names == sorted(n for n, r in broken_folder.expected.items() if r is None)


def test_too_small_depends_on_the_split_crop(tmp_path, image_folder):
    """40×48 images fit a 40 train crop but not a 48 eval crop."""
    with pytest.raises(DataError, match=r"no usable eval images in .*: 1 found: 1 too-small "
                                        r"\(images must be at least 48×48\)"):
        load_datasets(cfg(tmp_path, data=image_folder, crop=48, train_crop=40),
                      SOBEL, SOBEL_PARAMS)


def test_progress_bar_goes_to_stderr(tmp_path, image_folder, capsys):
    """progress=True shows tqdm on stderr; stdout stays empty."""
    load_datasets(cfg(tmp_path, data=image_folder), SOBEL, SOBEL_PARAMS, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "loading" in err


def test_max_images_keeps_the_first_of_each_part(tmp_path, image_folder):
    """--max-images 1: one sorted-first file per part."""
    full = load_datasets(cfg(tmp_path, data=image_folder), SOBEL, SOBEL_PARAMS)
    one = load_datasets(cfg(tmp_path, data=image_folder, max_images=1), SOBEL, SOBEL_PARAMS)
    assert one.train.names == full.train.names[:1] and one.eval.names == full.eval.names[:1]


# --- errors -------------------------------------------------------------------------------------

def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    """Missing folder, empty folder, a single file and nothing usable: one-line DataErrors."""
    with pytest.raises(DataError, match=r"^--data: folder not found: .*nowhere$"):
        load_datasets(cfg(tmp_path, data=tmp_path / "nowhere"), SOBEL, SOBEL_PARAMS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"^--data: no image files .* found in .*empty$"):
        load_datasets(cfg(tmp_path, data=tmp_path / "empty"), SOBEL, SOBEL_PARAMS)
    (tmp_path / "one").mkdir()
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "one" / "x.png")
    with pytest.raises(DataError, match="holds 1 image file; a split .* needs at least 2"):
        load_datasets(cfg(tmp_path, data=tmp_path / "one"), SOBEL, SOBEL_PARAMS)
    with pytest.raises(DataError, match=r"^--eval-data: folder not found"):
        load_datasets(cfg(tmp_path, data=tmp_path / "one", eval_data=tmp_path / "no"),
                      SOBEL, SOBEL_PARAMS)


def test_nothing_usable_names_folder_and_counts(tmp_path):
    """All files bad: the error names the folder and the counts by reason, no warning."""
    root = tmp_path / "bad"
    root.mkdir()
    for name in ("a.png", "b.png", "c.jpg"):
        (root / name).write_text("text")
    (root / "d.png").write_bytes(b"")
    with no_warnings(), pytest.raises(DataError) as info:
        load_datasets(cfg(tmp_path, data=root), SOBEL, SOBEL_PARAMS)
    message = str(info.value)
    assert message.startswith(f"no usable training images in {root}: ")
    assert "\n" not in message and ("not-an-image" in message or "empty" in message)


# --- cache --------------------------------------------------------------------------------------

def test_second_build_is_all_cache_hits_without_operator_calls(tmp_path, image_folder):
    """The second build decodes nothing and calls the operator zero times."""
    task, calls = counting(SOBEL)
    first = load_datasets(cfg(tmp_path, data=image_folder), task, SOBEL_PARAMS)
    assert len(calls) == 6 and first.report.cache_hits == 0 and len(entries(tmp_path)) == 6
    second = load_datasets(cfg(tmp_path, data=image_folder), task, SOBEL_PARAMS)
    assert len(calls) == 6 and second.report.cache_hits == 6
    assert second.report.summary() == "used 6 of 6 images (6 from cache)"
    for a, b in zip(first.train.targets, second.train.targets):
        np.testing.assert_array_equal(a, b)


def test_changed_param_or_file_misses(tmp_path, image_folder):
    """A different task parameter misses everything; a touched file misses only itself."""
    task, calls = counting(SOBEL)
    load_datasets(cfg(tmp_path, data=image_folder), task, SOBEL_PARAMS)
    other = {**SOBEL_PARAMS, "mode": "nearest"}
    assert load_datasets(cfg(tmp_path, data=image_folder), task, other).report.cache_hits == 0
    assert len(calls) == 12
    path = image_folder / "a" / "one.png"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    again = load_datasets(cfg(tmp_path, data=image_folder), task, SOBEL_PARAMS)
    assert again.report.cache_hits == 5 and len(calls) == 13


def test_damaged_cache_entries_are_rebuilt(tmp_path, image_folder):
    """A truncated entry, garbage and an over-long file are never trusted: rebuilt and equal."""
    task, calls = counting(SOBEL)
    first = load_datasets(cfg(tmp_path, data=image_folder), task, SOBEL_PARAMS)
    # copy, then drop the memory maps: damaging a mapped file in place would be a SIGBUS
    before = [np.array(x) for x in first.train.inputs + first.eval.inputs]
    del first
    files = entries(tmp_path)
    files[0].write_bytes(files[0].read_bytes()[:-7])
    files[1].write_bytes(b"garbage")
    files[2].write_bytes(files[2].read_bytes() + b"\0" * 8)
    second = load_datasets(cfg(tmp_path, data=image_folder), task, SOBEL_PARAMS)
    assert len(calls) == 9 and second.report.cache_hits == 3
    for a, b in zip(before, second.train.inputs + second.eval.inputs):
        np.testing.assert_array_equal(a, b)


def test_killed_write_leaves_no_entry(tmp_path, image_folder, monkeypatch):
    """A build killed mid-write leaves neither an entry nor a temp file; the next one recomputes."""
    real_save = np.save

    def half_then_die(fh, arr, **kwargs):
        fh.write(b"\x93NUMPY partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_mod.np, "save", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        load_datasets(cfg(tmp_path, data=image_folder), SOBEL, SOBEL_PARAMS)
    folder = tmp_path / "cache" / f"arrays-v{CACHE_FORMAT}"
    assert list(folder.iterdir()) == []
    monkeypatch.setattr(cache_mod.np, "save", real_save)
    assert load_datasets(cfg(tmp_path, data=image_folder), SOBEL, SOBEL_PARAMS).report.cache_hits == 0


def test_stale_temp_files_are_removed(tmp_path, image_folder):
    """Temp files older than an hour (a killed process) are deleted; fresh ones are left alone."""
    folder = tmp_path / "cache" / f"arrays-v{CACHE_FORMAT}"
    folder.mkdir(parents=True)
    old, fresh = folder / ".abc.1.x.tmp", folder / ".def.2.y.tmp"
    old.write_bytes(b"x")
    fresh.write_bytes(b"x")
    past = time.time() - 2 * cache_mod.STALE_TEMP_SECONDS
    os.utime(old, (past, past))
    load_datasets(cfg(tmp_path, data=image_folder), SOBEL, SOBEL_PARAMS)
    assert not old.exists() and fresh.exists()


def test_cache_folder_precedence(tmp_path, monkeypatch):
    """--cache-dir, then $SELFSCALE_CACHE, then $XDG_CACHE_HOME/selfscale."""
    assert cache_folder(tmp_path / "x") == tmp_path / "x"
    monkeypatch.setenv("SELFSCALE_CACHE", str(tmp_path / "env"))
    assert cache_folder(None) == tmp_path / "env"
    monkeypatch.delenv("SELFSCALE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_folder(None) == tmp_path / "xdg" / "selfscale"


# --- split --------------------------------------------------------------------------------------

def test_split_is_deterministic_and_order_free():
    """Same names and seed → same split, whatever the order; sizes follow eval_fraction."""
    names = [f"img{i:02d}.png" for i in range(20)]
    train, evals = split_by_file(names, 0.2, 3)
    assert (train, evals) == split_by_file(names[::-1], 0.2, 3)
    assert len(evals) == 4 and sorted(train + evals) == names and not set(train) & set(evals)
    assert split_by_file(names, 0.2, 4) != (train, evals)
    assert [len(split_by_file(names[:n], 0.01, 0)[1]) for n in (2, 3)] == [1, 1]
    assert [len(split_by_file(names[:n], 0.99, 0)[0]) for n in (2, 3)] == [1, 1]


def test_split_moves_little_when_a_file_is_added():
    """Adding one file changes the eval part by at most one file."""
    names = [f"img{i:02d}.png" for i in range(20)]
    _, before = split_by_file(names, 0.25, 0)
    _, after = split_by_file(names + ["new.png"], 0.25, 0)
    assert len(set(before) - set(after)) <= 1


def test_split_of_data_folder_is_reproducible(tmp_path, image_folder):
    """load_datasets splits --data the same way every time, by --split-seed."""
    a = load_datasets(cfg(tmp_path, data=image_folder, split_seed=5), SOBEL, SOBEL_PARAMS)
    b = load_datasets(cfg(tmp_path, data=image_folder, split_seed=5), SOBEL, SOBEL_PARAMS)
    assert (a.train.names, a.eval.names) == (b.train.names, b.eval.names)
    assert len(a.eval) == 1  # round(6 × 0.2)


# --- pairs --------------------------------------------------------------------------------------

def test_pairs_reads_targets_by_relative_path_and_stem(tmp_path, image_folder):
    """Targets come from the same relative path and stem, any suffix; a missing or wrongly sized
    target is skipped with its reason."""
    pairs = get_task("pairs")
    targets = tmp_path / "targets"
    for path in image_folder.rglob("*.*"):
        rel = path.relative_to(image_folder).with_suffix(".tif")
        (targets / rel.parent).mkdir(parents=True, exist_ok=True)
        edge = (255 - np.asarray(Image.open(path).convert("L"))).astype(np.uint8)
        Image.fromarray(edge).save(targets / rel)
    (targets / "a" / "two.tif").unlink()
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(targets / "b" / "three.tif")
    config = cfg(tmp_path, data=image_folder, targets=targets, eval_fraction=0.5)
    with pytest.warns(SkippedImagesWarning, match=r"skipped 2 of 6 images: 1 size-mismatch "
                      r"\(first: b/three.png\), 1 no-target \(first: a/two.png\)$"):
        sets = load_datasets(config, pairs, {})
    assert sets.report.skipped == {"no-target": 1, "size-mismatch": 1}
    for images in (sets.train, sets.eval):
        for name, x, y in zip(images.names, images.inputs, images.targets):
            target = load_gray((targets / name).with_suffix(".tif"))
            np.testing.assert_array_equal(y, target)
            np.testing.assert_allclose(x, 1 - target, atol=1 / 255 + 1e-6)


def test_pairs_without_targets_is_an_error(tmp_path, image_folder):
    """Task pairs needs --targets, then --data (bundled data has no targets), then
    --eval-targets with --eval-data: ConfigErrors, raised before any folder is read."""
    pairs = get_task("pairs")
    needs_targets = "^--targets: task 'pairs' needs a folder of target images$"
    with pytest.raises(ConfigError, match=needs_targets):
        load_datasets(cfg(tmp_path, data=image_folder), pairs, {})
    with pytest.raises(ConfigError, match=needs_targets):
        load_datasets(cfg(tmp_path), pairs, {})
    with pytest.raises(ConfigError, match=needs_targets):
        load_eval_set(tmp_path / "nowhere", cfg(tmp_path), pairs, {})
    with pytest.raises(ConfigError, match="^--data: task 'pairs' needs --data and --targets"):
        load_datasets(cfg(tmp_path, targets=image_folder), pairs, {})
    with pytest.raises(ConfigError, match="^--data: task 'pairs' needs --data and --targets"):
        load_eval_set(None, cfg(tmp_path), pairs, {}, targets=image_folder)
    with pytest.raises(DataError, match="^--targets: target folder not found: .*nowhere"):
        load_datasets(cfg(tmp_path, data=image_folder, targets=tmp_path / "nowhere"), pairs, {})
    with pytest.raises(ConfigError, match="^--eval-targets: task 'pairs' with --eval-data needs"):
        load_datasets(cfg(tmp_path, data=image_folder, targets=image_folder,
                          eval_data=image_folder), pairs, {})


# --- crops and batches --------------------------------------------------------------------------

def _toy_set() -> ImageSet:
    rng = np.random.default_rng(0)
    inputs = [rng.random((30, 40), dtype=np.float32), rng.random((25, 21), dtype=np.float32)]
    return ImageSet(["a", "b"], inputs, [1 - x for x in inputs])


def test_sample_batch_reproducible_and_cut_from_whole_arrays():
    """Same seed → same batch; each crop is the region the documented rng order selects."""
    images = _toy_set()
    for flips in (False, True):
        x, y = sample_batch(images, np.random.default_rng(7), 5, 16, flips)
        x2, y2 = sample_batch(images, np.random.default_rng(7), 5, 16, flips)
        np.testing.assert_array_equal(x, x2)
        assert x.shape == y.shape == (5, 1, 16, 16) and x.dtype == np.float32
        assert x.flags.c_contiguous and not np.shares_memory(x, images.inputs[0])
        rng = np.random.default_rng(7)
        for i in range(5):
            k = int(rng.integers(2))
            h, w = images.inputs[k].shape
            top, left = int(rng.integers(h - 15)), int(rng.integers(w - 15))
            region = np.s_[top:top + 16, left:left + 16]
            xi, yi = images.inputs[k][region], images.targets[k][region]
            if flips:
                if rng.random() < 0.5:
                    xi, yi = xi[:, ::-1], yi[:, ::-1]
                if rng.random() < 0.5:
                    xi, yi = xi[::-1], yi[::-1]
            np.testing.assert_array_equal(x[i, 0], xi)
            np.testing.assert_array_equal(y[i, 0], yi)
    other, _ = sample_batch(images, np.random.default_rng(8), 5, 16, False)
    assert not np.array_equal(other, sample_batch(images, np.random.default_rng(7), 5, 16, False)[0])


def test_sample_batch_flips_both_ways_over_many_draws():
    """With flips, input and target stay aligned and all four orientations occur."""
    images = _toy_set()
    x, y = sample_batch(images, np.random.default_rng(1), 200, 20, True)
    np.testing.assert_array_equal(y, 1 - x)
    assert len({int(np.argmax(c[0])) for c in x}) > 4


def _python_batch(monkeypatch, *args):
    """sample_batch's Python loop (the kernels hidden)."""
    with monkeypatch.context() as m:
        m.setattr(direct, "_library", None)
        return sample_batch(*args)


@needs_kernels
def test_the_kernel_draws_the_python_loop_s_batches_and_generator_state(monkeypatch):
    """ss_sample makes numpy's draws in the same order: the same crops, and the same generator
    state after them, with and without flips; for an image exactly as tall as the crop (no draw
    for its top), a single image (no draw for the index) and a view with a longer row stride."""
    gen = np.random.default_rng(3)
    big = gen.random((40, 64), dtype=np.float32)
    tall = gen.random((16, 33), dtype=np.float32)
    sets = [_toy_set(), ImageSet(["tall", "view"], [tall, big[5:30, :37]], [tall * 2, big[:25, 1:38]]),
            ImageSet(["one"], [big], [1 - big])]
    for images in sets:
        for flips in (False, True):
            assert crops._sample_kernel(images, np.random.default_rng(0), 2, 16, flips) is not None
            for seed in range(15):
                kernel, python = np.random.default_rng(seed), np.random.default_rng(seed)
                for _ in range(3):
                    x, y = sample_batch(images, kernel, 6, 16, flips)
                    x2, y2 = _python_batch(monkeypatch, images, python, 6, 16, flips)
                    np.testing.assert_array_equal(x, x2)
                    np.testing.assert_array_equal(y, y2)
                assert kernel.bit_generator.state == python.bit_generator.state


@needs_kernels
def test_the_kernel_s_bounded_draw_is_numpy_s_integers_rejections_included():
    """rng.integers(n) from the bit generator, interleaved with rng.random(): for n = 3·2³⁰ a
    quarter of the draws are rejected and drawn again."""
    for n in (1, 2, 7, 1000, 2**31 + 1, 3 * 2**30, 2**32 - 1, 2**32):
        ours, numpy_s = np.random.default_rng(n), np.random.default_rng(n)
        bits = ours.bit_generator.ctypes.bit_generator
        got, want = [], []
        for i in range(200):
            got.append(direct._library.ss_integers_draw(bits, n))
            want.append(int(numpy_s.integers(n)))
            if i % 3 == 0:
                got.append(ours.random())
                want.append(numpy_s.random())
        assert got == want, n
        assert ours.bit_generator.state == numpy_s.bit_generator.state


def test_images_the_kernel_does_not_take_go_the_python_way(monkeypatch):
    """float64 arrays, a transposed view and a crop larger than an image take the Python loop:
    the same batches, and the same error naming the image."""
    gen = np.random.default_rng(4)
    wide = gen.random((20, 30), dtype=np.float32)
    for images in (ImageSet(["f64"], [wide.astype(np.float64)], [wide.astype(np.float64)]),
                   ImageSet(["t"], [wide.T], [wide.T])):
        assert crops._kernel_table(images) is None
        x, _ = sample_batch(images, np.random.default_rng(1), 3, 8, True)
        np.testing.assert_array_equal(
            x, _python_batch(monkeypatch, images, np.random.default_rng(1), 3, 8, True)[0])
    with pytest.raises(ValueError, match="crop 22 does not fit b"):
        sample_batch(_toy_set(), np.random.default_rng(0), 40, 22, False)


def test_crop_larger_than_image_is_rejected():
    """A crop that does not fit names the image."""
    with pytest.raises(ValueError, match="crop 26 does not fit b"):
        center_crops(_toy_set(), 26)
    with pytest.raises(ValueError, match="empty"):
        sample_batch(ImageSet([], [], []), np.random.default_rng(0), 1, 8, False)


def test_require_crop_fits_counts_and_names_the_first_too_small():
    """Silent when every image fits; else a ConfigError naming --crop, the count and the first
    image that is too small, as H×W."""
    images = _toy_set()  # a: 30×40, b: 25×21
    require_crop_fits(images, 21)
    with pytest.raises(ConfigError, match=r"^--crop: 22 does not fit 1 eval image\(s\), e\.g\. b "
                                          r"\(25×21\); use a smaller --crop or --full$"):
        require_crop_fits(images, 22)
    with pytest.raises(ConfigError, match=r"^--crop: 31 does not fit 2 eval image\(s\), e\.g\. a "
                                          r"\(30×40\)"):
        require_crop_fits(images, 31)


def test_center_crops_position():
    """Centre crop starts at ((H − c) // 2, (W − c) // 2): (7, 12) and (4, 2) for c = 16."""
    images = _toy_set()
    x, y = center_crops(images, 16)
    assert x.shape == (2, 1, 16, 16)
    np.testing.assert_array_equal(x[0, 0], images.inputs[0][7:23, 12:28])
    np.testing.assert_array_equal(x[1, 0], images.inputs[1][4:20, 2:18])
    np.testing.assert_array_equal(y, 1 - x)


def test_center_crop_chunks_are_the_chunks_crops_held_on_the_set(monkeypatch):
    """Chunks of 2 of a 5-image set: the centre crops of each chunk, the same bits. The whole
    set's crops are made once and kept on it (the second pass yields views of the same arrays,
    a sub-set holds nothing); above HELD_BYTES every chunk is cut anew and nothing is kept."""
    import selfscale.crops as crops

    rng = np.random.default_rng(2)
    inputs = [rng.random((20 + i, 18 + 2 * i), dtype=np.float32) for i in range(5)]
    images = ImageSet(list("abcde"), inputs, [x * x for x in inputs])
    want = [center_crops(images[i:i + 2], 16) for i in range(0, 5, 2)]
    for _ in range(2):
        got = list(crops.center_crop_chunks(images, 16, 2))
        assert len(got) == 3
        for (x, y), (wx, wy) in zip(got, want, strict=True):
            np.testing.assert_array_equal(x, wx)
            np.testing.assert_array_equal(y, wy)
        assert all(np.shares_memory(x, images.held["center", 16][0]) for x, _ in got)
    assert images[:2].held == {}
    fresh = ImageSet(images.names, images.inputs, images.targets)
    monkeypatch.setattr(crops, "HELD_BYTES", 8 * 5 * 16 * 16 - 1)
    got = list(crops.center_crop_chunks(fresh, 16, 2))
    assert fresh.held == {}
    for (x, y), (wx, wy) in zip(got, want, strict=True):
        np.testing.assert_array_equal(x, wx)
        np.testing.assert_array_equal(y, wy)
    with pytest.raises(ValueError, match="crop 21 does not fit a"):
        list(crops.center_crop_chunks(images, 21, 2))


# --- bundled ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    """The default bundled data set at the default crop, built once into a module cache."""
    cache = tmp_path_factory.mktemp("bundled-cache")
    with no_warnings():
        return load_datasets(DataConfig(cache_dir=cache, train_crop=None), SOBEL, SOBEL_PARAMS), cache


def test_bundled_split_is_fixed_and_disjoint():
    """Fixed names, no image in both parts, every file shipped with scikit-image."""
    train, evals = bundled_image_paths()
    assert [p.name for p in train] == list(BUNDLED_TRAIN)
    assert [p.name for p in evals] == list(BUNDLED_EVAL) == ["camera.png", "coffee.png",
                                                             "coins.png", "gravel.png"]
    assert not set(BUNDLED_TRAIN) & set(BUNDLED_EVAL)
    assert all(p.is_file() for p in train + evals)


def test_bundled_default_loads_everything_without_warnings(bundled):
    """At the default crop 256 every bundled image is used and nothing warns."""
    sets, _ = bundled
    assert sets.source == "bundled"
    assert sets.train.names == list(BUNDLED_TRAIN) and sets.eval.names == list(BUNDLED_EVAL)
    assert sets.report.n_used == sets.report.n_found == len(BUNDLED_TRAIN) + len(BUNDLED_EVAL)
    camera = sets.eval.inputs[0]
    assert camera.shape == (512, 512) and 0.0 <= camera.min() and camera.max() <= 1.0


def test_load_eval_set_none_is_the_bundled_eval_split(bundled):
    """load_eval_set(None) gives the bundled eval images, from the cache."""
    sets, cache = bundled
    images = load_eval_set(None, DataConfig(cache_dir=cache), SOBEL, SOBEL_PARAMS)
    assert images.names == list(BUNDLED_EVAL)
    for a, b in zip(images.targets, sets.eval.targets):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("helper", [True, False])
def test_a_batch_stream_gives_sample_batch_s_batches_and_generator_state(helper):
    """Batches taken with and without the next one drawn ahead (copied on the helper thread)
    are sample_batch's, in order, and where no batch is pending the generator is where
    sample_batch leaves it; closing with a batch pending puts the generator back before it."""
    images = _toy_set()
    pattern = [True, True, False, True, False, False, True, True, True, False]
    stream_rng, rng = np.random.default_rng(5), np.random.default_rng(5)
    with crops.BatchStream(images, stream_rng, 4, 16, True, helper=helper) as stream:
        assert stream.threaded == (helper and direct._library is not None)
        for ahead in pattern:
            x, y = stream.take(ahead)
            x2, y2 = sample_batch(images, rng, 4, 16, True)
            np.testing.assert_array_equal(x, x2)
            np.testing.assert_array_equal(y, y2)
            if not ahead:
                assert stream_rng.bit_generator.state == rng.bit_generator.state
        stream.take(True)
        sample_batch(images, rng, 4, 16, True)
        ahead = stream_rng.bit_generator.state != rng.bit_generator.state
        assert ahead == stream.threaded  # the helper's batch is drawn
    assert stream_rng.bit_generator.state == rng.bit_generator.state
