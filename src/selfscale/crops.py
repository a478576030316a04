"""Crops and batches cut from whole images: random training batches, centre crops, fit checks.

Crops are cut from the whole arrays of an :class:`~selfscale.data.ImageSet`, so a crop's target
equals the operator applied to the whole image, then cropped (no border effects at crop edges).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from typing import Any, Self

import numpy as np

from selfscale.data import ImageSet
from selfscale.errors import ConfigError


def require_crop_fits(images: ImageSet, crop: int) -> None:
    """ConfigError naming --crop, the number of eval images it does not fit and the first of
    them, unless every image is at least ``crop`` on both sides."""
    too_small = [(n, x.shape) for n, x in zip(images.names, images.inputs) if min(x.shape) < crop]
    if too_small:
        name, (h, w) = too_small[0]
        raise ConfigError(f"--crop: {crop} does not fit {len(too_small)} eval image(s), e.g. "
                          f"{name} ({h}×{w}); use a smaller --crop or --full")


def sample_batch(images: ImageSet, rng: np.random.Generator, batch: int, crop: int,
                 flips: bool) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` random ``crop``×``crop`` crops of inputs and targets, each (N, 1, crop, crop).

    For each crop in turn, ``rng`` is consumed in this fixed order: image index
    ``rng.integers(len(images))``; top ``rng.integers(H − crop + 1)``; left
    ``rng.integers(W − crop + 1)``; then, only when ``flips``, ``rng.random() < 0.5`` for a
    horizontal flip (columns reversed) and ``rng.random() < 0.5`` for a vertical one (rows
    reversed), applied identically to input and target. A seed therefore reproduces the batches.
    With the direct kernels loaded, one C++ call makes these draws and copies (the same batches
    and generator state, about half the time).
    """
    if not len(images):
        raise ValueError("sample_batch: the image set is empty")
    drawn = _sample_kernel(images, rng, batch, crop, flips)
    if drawn is not None:
        return drawn
    xs, ys = _empty_batch(batch, crop)
    count = len(images)
    for i in range(batch):
        k = int(rng.integers(count))
        # plain views of the (memory-mapped) arrays: a memmap's slicing costs 5× an array's
        image, target = np.asarray(images.inputs[k]), np.asarray(images.targets[k])
        h, w = image.shape
        if h < crop or w < crop:
            raise ValueError(f"sample_batch: crop {crop} does not fit {images.names[k]} ({w}×{h})")
        top = int(rng.integers(h - crop + 1))
        left = int(rng.integers(w - crop + 1))
        rows, cols = slice(top, top + crop), slice(left, left + crop)
        if flips:
            if rng.random() < 0.5:  # horizontal: columns reversed
                cols = slice(left + crop - 1, left - 1 if left else None, -1)
            if rng.random() < 0.5:  # vertical: rows reversed
                rows = slice(top + crop - 1, top - 1 if top else None, -1)
        xs[i, 0] = image[rows, cols]
        ys[i, 0] = target[rows, cols]
    return xs, ys


def spare_core() -> bool:
    """Whether torch's threads leave a core of this process's free (for a helper thread; on a
    full machine it would only take turns with them)."""
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return cores > torch.get_num_threads()


class BatchStream:
    """The batches of :func:`sample_batch`, drawn from ``rng`` in the same order, each one
    copied on a helper thread of the direct kernels while the caller trains on the one before.

    ``take(ahead)`` returns the next batch; with ``ahead`` it also makes the draws of the batch
    after it at once and starts its copy. So the caller passes ``ahead=False`` whenever anything
    else may read, draw from or save ``rng`` before the following ``take`` (an evaluation, a
    checkpoint, the end): then every draw happens where :func:`sample_batch` would make it, and
    the batches, the generator's state and everything downstream are the same bits. Closing the
    stream (also on an exception) waits for a copy in flight and puts the generator back to
    before the draws of a batch not taken. Without the kernels, for a set they do not take, or
    with ``helper=False``, every batch is drawn and copied in ``take``; by default (None) the
    helper runs when torch's threads leave a core free (:func:`spare_core`).
    """

    def __init__(self, images: ImageSet, rng: np.random.Generator, batch: int, crop: int,
                 flips: bool, helper: bool | None = None) -> None:
        if helper is None:
            helper = spare_core()
        self._args = (images, rng, batch, crop, flips)
        self._lib = self._table = self._stream = self._buffers = None
        self._next: tuple[np.ndarray, np.ndarray, dict] | None = None
        sampler = _kernel_sampler(images, rng, crop)
        if sampler is not None:
            self._lib, self._table = sampler
            self._keep = _TABLES[id(images)]  # the arrays the pointers point into
            if helper:
                self._stream = self._lib.ss_stream_new() or None

    @property
    def threaded(self) -> bool:
        """Whether copies run on the helper thread."""
        return self._stream is not None

    def kernel_args(self) -> tuple | None:
        """For a kernel that samples the batches itself (``ss_steps``): the helper stream (or
        None), the generator, then ``ss_sample``'s arguments from the image count to ``flips``,
        the bit generator's left out; None without the kernels or for a set they do not take."""
        if self._table is None or self._next is not None:
            return None
        images, rng, batch, crop, flips = self._args
        return (self._stream, rng, len(images), *self._table["args"], batch, crop, int(flips))

    def buffers(self) -> tuple[np.ndarray, ...]:
        """Two pairs of batch buffers (x0, y0, x1, y1), (N, 1, crop, crop) float32, kept."""
        if self._buffers is None:
            _, _, batch, crop, _ = self._args
            self._buffers = (*_empty_batch(batch, crop), *_empty_batch(batch, crop))
        return self._buffers

    def rewind(self, state: dict, batches: int) -> None:
        """Put the generator back to ``state`` and make the draws of ``batches`` batches again,
        without their copies (after a kernel call that drew a batch it did not use)."""
        images, rng, batch, crop, flips = self._args
        bits = rng.bit_generator
        with bits.lock:
            bits.state = state
            self._lib.ss_sample_draws(bits.ctypes.bit_generator, len(images), self._table["H"],
                                      self._table["W"], batches, batch, crop, int(flips))

    def take(self, ahead: bool) -> tuple[np.ndarray, np.ndarray]:
        """The next batch, (N, 1, crop, crop) inputs and targets; with ``ahead``, the draws of
        the one after it are made now and its copy starts."""
        if self._next is not None:
            self._lib.ss_stream_wait(self._stream)
            xs, ys, _ = self._next
            self._next = None
        else:
            xs, ys = sample_batch(*self._args)
        if ahead and self._stream is not None:
            images, rng, batch, crop, flips = self._args
            nx, ny = _empty_batch(batch, crop)
            bits = rng.bit_generator
            with bits.lock:
                before = bits.state
                self._lib.ss_stream_sample(self._stream, bits.ctypes.bit_generator, len(images),
                                           *self._table["args"], batch, crop, int(flips),
                                           nx.ctypes.data, ny.ctypes.data)
            self._next = (nx, ny, before)
        return xs, ys

    def close(self) -> None:
        """Wait for a copy in flight, end the helper thread, and put the generator back to
        before the draws of a batch made ahead and not taken."""
        if self._stream is not None:
            self._lib.ss_stream_free(self._stream)
            self._stream = None
        if self._next is not None:
            self._args[1].bit_generator.state = self._next[2]
            self._next = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def center_crops(images: ImageSet, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """The centre ``crop``×``crop`` of every input and target, (N, 1, crop, crop) float32.

    The crop starts at row ``(H − crop) // 2`` and column ``(W − crop) // 2``.
    """
    xs = np.empty((len(images), 1, crop, crop), dtype=np.float32)
    ys = np.empty((len(images), 1, crop, crop), dtype=np.float32)
    for i, (name, image, target) in enumerate(zip(images.names, images.inputs, images.targets)):
        h, w = image.shape
        if h < crop or w < crop:
            raise ValueError(f"center_crops: crop {crop} does not fit {name} ({w}×{h})")
        top, left = (h - crop) // 2, (w - crop) // 2
        xs[i, 0] = image[top:top + crop, left:left + crop]
        ys[i, 0] = target[top:top + crop, left:left + crop]
    return xs, ys


HELD_BYTES = 64 * 2**20
"""The most bytes of centre crops (inputs and targets) a set keeps for its next evaluation."""


def center_crop_chunks(images: ImageSet, crop: int,
                       size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """:func:`center_crops` of consecutive chunks of at most ``size`` images. The crops of the
    whole set are made at the first call and kept on the set (``images.held``) when they take
    at most :data:`HELD_BYTES`: an evaluation set is cropped at every evaluation, and cutting 4
    crops of 256² from memory maps into new arrays took as long as the forward pass of a 1/1/1
    network over them. Callers must not write to what they are given."""
    if 8 * len(images) * crop * crop > HELD_BYTES:
        for chunk in images.chunks(size):
            yield center_crops(chunk, crop)
        return
    if ("center", crop) not in images.held:
        images.held["center", crop] = center_crops(images, crop)
    xs, ys = images.held["center", crop]
    for start in range(0, len(images), size):
        yield xs[start:start + size], ys[start:start + size]


def _empty_batch(batch: int, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """Uninitialized inputs and targets of a batch, (N, 1, crop, crop) float32."""
    return (np.empty((batch, 1, crop, crop), dtype=np.float32),
            np.empty((batch, 1, crop, crop), dtype=np.float32))


def _kernel_sampler(images: ImageSet, rng: np.random.Generator,
                    crop: int) -> tuple[ctypes.CDLL, dict[str, Any]] | None:
    """The loaded kernels and ``images``' table when ``ss_sample`` takes this set, generator
    and crop: the kernels are loaded, ``rng`` is a numpy Generator and every image suits them
    (float32 rows, columns contiguous, at least ``crop`` on both sides); None otherwise."""
    from selfscale import direct

    lib = direct._library
    if lib is None or type(rng) is not np.random.Generator or not len(images):
        return None
    table = _kernel_table(images)
    if table is None or crop > table["min_side"]:
        return None  # the Python loop says which image is too small
    return lib, table


def _sample_kernel(images: ImageSet, rng: np.random.Generator, batch: int, crop: int,
                   flips: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`sample_batch` in one call of the direct kernels (``ss_sample``) where they take
    the set (:func:`_kernel_sampler`); None otherwise. It makes the same draws on the
    generator's own bit generator in the same order, so the crops, and the generator's state
    after them, are the same; the Python loop spent about 15 µs a crop on numpy calls."""
    sampler = _kernel_sampler(images, rng, crop)
    if sampler is None:
        return None
    lib, table = sampler
    xs, ys = _empty_batch(batch, crop)
    bits = rng.bit_generator
    with bits.lock:
        lib.ss_sample(bits.ctypes.bit_generator, len(images), *table["args"], batch, crop,
                      int(flips), xs.ctypes.data, ys.ctypes.data)
    return xs, ys


_TABLES: dict[int, tuple[ImageSet, list[int], dict[str, Any] | None, list]] = {}
"""``ss_sample``'s tables of the last few image sets, by id; each entry holds its set and
arrays, so their ids cannot be reused while it is here."""


def _kernel_table(images: ImageSet) -> dict[str, Any] | None:
    """``ss_sample``'s per-image arguments, kept while the set holds the same arrays; None when
    an image does not suit."""
    key = [*map(id, images.inputs), *map(id, images.targets)]
    cached = _TABLES.get(id(images))
    if cached is not None and cached[0] is images and cached[1] == key:
        return cached[2]
    arrays = [(np.asarray(x), np.asarray(y)) for x, y in zip(images.inputs, images.targets)]
    suits = all(a.dtype == np.float32 and a.ndim == 2 and a.strides[1] == 4
                and a.strides[0] % 4 == 0 and a.strides[0] > 0 and a.shape == x.shape
                and max(a.shape) < 2 ** 32 for x, y in arrays for a in (x, y))
    table = None
    if suits:
        def longs(values: list[int]) -> ctypes.Array:
            return (ctypes.c_long * len(values))(*values)
        pointers = [(ctypes.c_void_p * len(arrays))(*[p[i].ctypes.data for p in arrays])
                    for i in (0, 1)]
        heights, widths = (longs([x.shape[i] for x, _ in arrays]) for i in (0, 1))
        table = {"min_side": min(min(x.shape) for x, _ in arrays), "H": heights, "W": widths,
                 "args": (*pointers, heights, widths,
                          longs([x.strides[0] // 4 for x, _ in arrays]),
                          longs([y.strides[0] // 4 for _, y in arrays]))}
    if len(_TABLES) >= 8:
        _TABLES.pop(next(iter(_TABLES)))
    _TABLES[id(images)] = (images, key, table, [*images.inputs, *images.targets, arrays])
    return table
