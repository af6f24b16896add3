"""Memory of a fit: estimates before its large allocations, and the on-disk feature store."""

from __future__ import annotations

import math
import os

import numpy as np
import torch

__all__ = [
    "FeatureFile", "available_memory", "batches", "check_fits_in_memory", "empty", "image_features",
    "patch_rows",
]

# Bytes of a FeatureFile mapped at a time while its rows are read.
_READ_CHUNK_BYTES = 64 * 2**20


def batches(n: int, size: int):
    """Slices of ``size`` covering ``range(n)``, as sklearn's ``gen_batches``, which
    validates its arguments on every call: 40 us, more than a small search step."""
    return (slice(lo, min(lo + size, n)) for lo in range(0, n, size))


def empty(shape) -> np.ndarray:
    """A float32 ``np.empty`` whose pages are not advised to be huge.

    numpy advises transparent huge pages for arrays of 4 MiB and more. Where
    the kernel then compacts memory at each page fault (Linux's default
    ``defrag=madvise``), filling a large fresh array batch by batch stalls:
    17-20 ms against 2.7-3.1 ms to store one image's 5.6 MB of features
    (the "accurate" preset at 512 px). torch's allocator gives no such advice
    (memory that the C allocator hands out again keeps any advice given earlier).
    """
    return torch.empty(shape, dtype=torch.float32).numpy()


def available_memory() -> int | None:
    """Bytes the system can still hand out without swapping, or None if unknown.

    Linux's ``MemAvailable`` counts reclaimable caches, which plain free
    memory does not; elsewhere the free pages are a lower estimate.
    """
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_in_memory(needs: dict[str, int], advice: str) -> None:
    """Raise a MemoryError naming what to change if ``needs`` exceed the available memory.

    Parameters
    ----------
    needs : dict of str to int
        Bytes about to be allocated, by what they hold.
    advice : str
        The parameters that would make them smaller.
    """
    available = available_memory()
    total = sum(needs.values())
    if available is None or total <= available:
        return
    parts = ", ".join(f"{what} {nbytes / 2**30:.2f} GiB" for what, nbytes in needs.items())
    raise MemoryError(
        f"This would need {total / 2**30:.2f} GiB ({parts}), more than the "
        f"{available / 2**30:.2f} GiB of memory available. {advice}"
    )


class FeatureFile:
    """Patch features of a fit in a float16 ``.npy`` file, written a batch of images at a time.

    Batches go in through plain file writes and rows come out through
    read-only maps of one chunk of the file at a time, unmapped once copied.
    A map of the whole file would hold every page written or read in the
    process's resident memory (2.3 GiB for 1,000 wide_resnet50_2 images at
    224 px, and a coreset's rows lie all over the file); these pages stay
    in the OS cache instead, which can write them out and drop them.

    Parameters
    ----------
    path : str
        The file to create.
    shape : tuple of int
        ``(n_images, h, w, D)``.
    """

    def __init__(self, path: str, shape: tuple[int, ...]) -> None:
        header = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)
        self.path, self.shape, self._offset = path, tuple(shape), header.offset
        del header  # unmapped: the file keeps its header and size
        self._row_bytes = 2 * shape[-1]
        self._image_rows = math.prod(shape[1:-1])
        self._file = open(path, "r+b")

    def __setitem__(self, images: slice, values: np.ndarray) -> None:
        self._file.seek(self._offset + images.start * self._image_rows * self._row_bytes)
        self._file.write(np.ascontiguousarray(values, dtype=np.float16).data)

    def close(self) -> None:
        """End the writes (before the rows are read, or the file removed)."""
        self._file.close()

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """All the features, read into memory (float16 unless ``dtype`` says otherwise)."""
        return np.load(self.path).astype(dtype or np.float16, copy=False)

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """Float32 rows of the flattened ``(n_images * h * w, D)`` features, in the order given."""
        rows = np.asarray(rows, dtype=np.int64)
        out = empty((len(rows), self.shape[-1]))
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        n_rows = self.shape[0] * self._image_rows
        step = max(1, _READ_CHUNK_BYTES // self._row_bytes)
        starts = np.arange(0, n_rows + step, step)
        ends = np.searchsorted(ordered, starts)
        for start, lo, hi in zip(starts, ends[:-1], ends[1:]):
            if lo < hi:
                chunk = np.memmap(
                    self.path, dtype=np.float16, mode="r", offset=self._offset + start * self._row_bytes,
                    shape=(min(step, n_rows - start), self.shape[-1]),
                )
                out[order[lo:hi]] = chunk[ordered[lo:hi] - start]
                del chunk
        return out

    def images(self, images: np.ndarray) -> np.ndarray:
        """Float32 features ``(len(images), h, w, D)`` of the images given."""
        first = np.asarray(images, dtype=np.int64)[:, None] * self._image_rows
        return self.rows((first + np.arange(self._image_rows)).ravel()).reshape(-1, *self.shape[1:])


def patch_rows(features, rows: np.ndarray) -> np.ndarray:
    """Float32 rows of the flattened features, from an array or a :class:`FeatureFile`."""
    if isinstance(features, FeatureFile):
        return features.rows(rows)
    return features.reshape(-1, features.shape[-1])[rows].astype(np.float32, copy=False)


def image_features(features, images: np.ndarray) -> np.ndarray:
    """Float32 features of ``images``, from an array (no copy when it holds just those,
    in order) or a :class:`FeatureFile`."""
    if isinstance(features, FeatureFile):
        return features.images(images)
    if np.array_equal(images, np.arange(len(features))):
        return features.astype(np.float32, copy=False)
    return features[images].astype(np.float32, copy=False)
