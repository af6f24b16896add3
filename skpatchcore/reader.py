"""Read image files into the arrays :class:`~skpatchcore.PatchCoreDetector` takes.

:class:`ImageReader` is a stateless transformer from a list of paths to an
image array, so that ``make_pipeline(ImageReader(), PatchCoreDetector())``
fits and predicts on file paths and ``GridSearchCV`` splits path lists.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from numbers import Integral

import numpy as np
from PIL import Image
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions

from .datasets import _open, _size_hw

__all__ = ["ImageReader", "read_image"]

# Pillow modes holding more than 8 bits per pixel: 16-bit PNG/TIFF open as
# "I;16*" (unsigned 16-bit) or "I" (32-bit int holding 16-bit values).
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_FULL_SCALE_16 = 65535.0


def read_image(path, *, color: str = "rgb", size: tuple[int, int] | None = None) -> np.ndarray:
    """Read one image file as the detector's pixel convention.

    Parameters
    ----------
    path : str or path-like
        PNG, JPEG, BMP, TIFF or any other format Pillow opens.
    color : {"rgb", "gray"}, default="rgb"
        ``"rgb"`` gives ``(H, W, 3)`` (grayscale files replicated, alpha
        dropped), ``"gray"`` gives ``(H, W)`` (colour files converted with
        Pillow's ITU-R 601-2 luma).
    size : (height, width) or None, default=None
        Resize to this size (bicubic); None keeps the file's size.

    Returns
    -------
    image : ndarray
        ``uint8`` in [0, 255] for 8-bit files; ``float32`` in [0, 1] for
        16-bit files, divided by 65535 (the type's full scale, not the
        image's own range, so brightness compares across files).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file cannot be decoded; the message names it.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Image file not found: {path}")
    image = _open(path, None)
    if image.mode in _HIGH_BIT_MODES:
        pixels = np.asarray(image, dtype=np.float32)
        if pixels.min() < 0 or pixels.max() > _FULL_SCALE_16:
            raise ValueError(
                f"Cannot read image file {path}: {image.mode}-mode pixels in "
                f"[{pixels.min():g}, {pixels.max():g}] are not 16-bit values."
            )
        pixels /= _FULL_SCALE_16
        if size is not None:
            resized = Image.fromarray(pixels, mode="F").resize(size[::-1], Image.Resampling.BICUBIC)
            pixels = np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)
        return np.repeat(pixels[..., np.newaxis], 3, axis=2) if color == "rgb" else pixels
    if image.mode == "F":
        raise ValueError(
            f"Cannot read image file {path}: floating-point images have no agreed scale; "
            "convert it to 8- or 16-bit integers."
        )
    image = image.convert("RGB" if color == "rgb" else "L")
    if size is not None:
        # PIL sizes are (width, height); bicubic as in the dataset loaders.
        image = image.resize(size[::-1], Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def _check_paths(X) -> list:
    """``X`` as a list of paths; one column of a 2-D array is accepted too."""
    if isinstance(X, (str, os.PathLike)):
        raise TypeError(
            f"ImageReader expects a sequence of file paths, got the single path {X!r}; "
            "wrap it in a list."
        )
    array = np.asarray(X, dtype=object)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1 or not all(isinstance(p, (str, os.PathLike)) for p in array):
        raise TypeError(
            "ImageReader expects a 1-D sequence of file paths (str or os.PathLike); got "
            f"{type(X).__name__} of shape {array.shape}. Arrays of pixels go straight to "
            "PatchCoreDetector without a reader."
        )
    if len(array) == 0:
        raise ValueError("Found 0 file paths; at least 1 is required.")
    return list(array)


class ImageReader(TransformerMixin, BaseEstimator):
    """Read image files from paths into an image array.

    A stateless transformer: :meth:`fit` learns nothing, and
    :meth:`transform` reads the files named by ``X`` into the array
    :class:`~skpatchcore.PatchCoreDetector` takes, so a pipeline of both fits,
    predicts and cross-validates on lists of paths.

    **Pixel values.** 8-bit files give ``uint8`` in [0, 255]. 16-bit
    grayscale files (PNG, TIFF; Pillow modes ``I;16`` and ``I``) are divided
    by 65535 and give ``float32`` in [0, 1]: the full scale of the type, not
    each image's own min and max, so that a dark image stays dark. When a
    call reads both kinds, all images come back as ``float32`` in [0, 1]
    (8-bit ones divided by 255). Colour files with 16 bits per channel are
    read by Pillow at 8 bits.

    Parameters
    ----------
    image_size : int, (height, width) or None, default=None
        Resize every image to this size (bicubic); an int gives a square. None
        keeps the files' size, which must then be the same for all the
        images of one call.
    color : {"rgb", "gray"}, default="rgb"
        ``"rgb"`` returns ``(n, H, W, 3)`` (grayscale files replicated to
        three channels, alpha dropped); ``"gray"`` returns ``(n, H, W)``.

    See Also
    --------
    skpatchcore.datasets.load_folder : List (``return_paths=True``) or read a folder of images.

    Examples
    --------
    >>> from sklearn.pipeline import make_pipeline
    >>> from skpatchcore import ImageReader, PatchCoreDetector
    >>> pipe = make_pipeline(ImageReader(image_size=256), PatchCoreDetector())
    >>> pipe.fit(["good/001.png", "good/002.png"])  # doctest: +SKIP
    >>> pipe.predict(["test/017.png"])  # doctest: +SKIP
    array([-1])
    """

    _parameter_constraints: dict = {
        "image_size": [Interval(Integral, 1, None, closed="left"), tuple, list, None],
        "color": [StrOptions({"rgb", "gray"})],
    }

    def __init__(self, *, image_size=None, color="rgb"):
        self.image_size = image_size
        self.color = color

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Validate the parameters; nothing is learned.

        Parameters
        ----------
        X : ignored
        y : ignored

        Returns
        -------
        self : ImageReader
        """
        _size_hw(self.image_size)
        return self

    def transform(self, X) -> np.ndarray:
        """Read the images.

        Parameters
        ----------
        X : sequence of str or path-like of length n_samples
            Image file paths (a list, a 1-D array, or an ``(n, 1)`` column).

        Returns
        -------
        images : ndarray of shape (n_samples, H, W, 3) or (n_samples, H, W)
            ``uint8`` when every file is 8-bit, else ``float32`` in [0, 1].

        Raises
        ------
        FileNotFoundError
            If a file does not exist; the message names it.
        ValueError
            If a file cannot be decoded (the message names it), or the
            images differ in size while ``image_size`` is None.
        """
        self._validate_params()
        size = _size_hw(self.image_size)
        paths = _check_paths(X)
        images = [read_image(p, color=self.color, size=size) for p in paths]
        _check_same_size(images, paths)
        if all(image.dtype == np.uint8 for image in images):
            return np.stack(images)
        out = np.empty((len(images), *images[0].shape), dtype=np.float32)
        for i, image in enumerate(images):
            out[i] = image / np.float32(255.0) if image.dtype == np.uint8 else image
        return out

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False  # stateless: transform works on an unfitted reader
        tags.input_tags.two_d_array = False
        tags.input_tags.one_d_array = True
        tags.input_tags.string = True
        return tags


def _check_same_size(images: Sequence[np.ndarray], paths: Sequence) -> None:
    first = images[0].shape[:2]
    for image, path in zip(images, paths, strict=True):
        if image.shape[:2] != first:
            raise ValueError(
                f"Images differ in size: {path} is {image.shape[1]}x{image.shape[0]} but "
                f"{paths[0]} is {first[1]}x{first[0]} (width x height). Pass "
                f"ImageReader(image_size=(height, width)) to resize them all to one size."
            )
