"""Loaders for MVTec AD and image folders, and a synthetic anomaly generator.

Every loader returns images as ``uint8`` arrays of shape ``(n, H, W, 3)``
(RGB; grayscale files are replicated to three channels, alpha is dropped) and
defect masks as ``bool`` arrays of shape ``(n, H, W)``, in a
:class:`sklearn.utils.Bunch` like :mod:`sklearn.datasets`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from numbers import Integral, Real
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from sklearn.utils import Bunch, check_random_state
from sklearn.utils._param_validation import Interval, validate_params

__all__ = ["load_mvtec", "load_folder", "make_anomaly_images"]

#: File name endings read as images (case-insensitive).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


# --------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------


def _size_hw(image_size) -> tuple[int, int] | None:
    """``image_size`` as ``(height, width)``, or None to keep files' size."""
    if image_size is None:
        return None
    if isinstance(image_size, Integral):
        size = (int(image_size), int(image_size))
    else:
        size = tuple(image_size)
        if len(size) != 2 or not all(isinstance(s, Integral) for s in size):
            raise ValueError(
                f"image_size must be an int or a (height, width) pair of ints; got {image_size!r}."
            )
    if min(size) < 1:
        raise ValueError(f"image_size must be positive; got {image_size!r}.")
    return int(size[0]), int(size[1])


def _check_dir(path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder not found: expected a directory at {path}.")
    return path


def _list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise FileNotFoundError(
            f"No images found in {folder}: expected files ending in {', '.join(IMAGE_EXTENSIONS)}."
        )
    return files


def _open(path: Path, mode: str | None) -> Image.Image:
    """The decoded image, converted to ``mode`` (None: as stored)."""
    try:
        with Image.open(path) as image:
            image.load()
            return image if mode is None else image.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"Cannot read image file {path}: {exc}") from exc


def _read_images(paths: Sequence[Path], size: tuple[int, int] | None) -> np.ndarray:
    """Read RGB images into one preallocated uint8 array (n, H, W, 3).

    Without ``size``, all files must share the first file's size.
    """
    first_size = None
    out = None
    for i, path in enumerate(paths):
        image = _open(path, "RGB")
        if size is None:
            if first_size is None:
                first_size = image.size
            elif image.size != first_size:
                raise _size_mismatch(path, image.size, paths[0], first_size)
        else:
            # PIL sizes are (width, height).
            image = image.resize(size[::-1], Image.Resampling.BICUBIC)
        array = np.asarray(image, dtype=np.uint8)
        if out is None:
            # Preallocate once so peak memory stays at the final array size.
            out = np.empty((len(paths),) + array.shape, dtype=np.uint8)
        out[i] = array
    return out


def _size_mismatch(path, size, first_path, first_size) -> ValueError:
    return ValueError(
        f"Images differ in size: {path} is {size[0]}x{size[1]} "
        f"but {first_path} is {first_size[0]}x{first_size[1]} (width x height). "
        "Pass image_size to resize them all."
    )


def _load_images(
    paths: Sequence[Path], size: tuple[int, int] | None, return_paths: bool
) -> tuple[np.ndarray, tuple[int, int]]:
    """The images (or, with ``return_paths``, their paths) and their ``(H, W)``.

    Paths are checked like pixels: without ``size`` all files must share one
    size, read from the file headers only.
    """
    if not return_paths:
        images = _read_images(paths, size)
        return images, images.shape[1:3]
    if size is None:
        sizes = []
        for path in paths:
            with Image.open(path) as image:
                sizes.append(image.size)
                if image.size != sizes[0]:
                    raise _size_mismatch(path, image.size, paths[0], sizes[0])
        size = sizes[0][::-1]
    return np.array([str(p) for p in paths]), size


def _find_mask(mask_dir: Path, stem: str) -> Path | None:
    """The mask for image ``stem`` in ``mask_dir``: ``stem.*`` or ``stem_mask.*``."""
    for name in (f"{stem}_mask", stem):
        for ext in IMAGE_EXTENSIONS:
            for candidate in (mask_dir / f"{name}{ext}", mask_dir / f"{name}{ext.upper()}"):
                if candidate.is_file():
                    return candidate
    return None


def _require_mask(mask_dir: Path, image_path: Path) -> Path:
    """:func:`_find_mask` for a defective image, which must have one."""
    mask = _find_mask(mask_dir, image_path.stem)
    if mask is None:
        raise FileNotFoundError(
            f"No mask found for defective image {image_path}: expected "
            f"{mask_dir / (image_path.stem + '_mask.png')} or "
            f"{mask_dir / (image_path.stem + '.png')} (any image extension)."
        )
    return mask


def _read_mask(mask_path: Path, image_path: Path, size: tuple[int, int] | None) -> np.ndarray:
    """Read a mask (nonzero = defect) as bool (H, W), checked against its image."""
    mask = _open(mask_path, "L")
    with Image.open(image_path) as image:
        image_size = image.size
    if mask.size != image_size:
        raise ValueError(
            f"Mask {mask_path} is {mask.size[0]}x{mask.size[1]} but its image "
            f"{image_path} is {image_size[0]}x{image_size[1]} (width x height); "
            "they must match."
        )
    if size is not None:
        # Nearest neighbour keeps the mask binary.
        mask = mask.resize(size[::-1], Image.Resampling.NEAREST)
    return np.asarray(mask) > 0


def _read_masks(
    image_paths: Sequence[Path],
    mask_paths: Sequence[Path | None],
    shape: tuple[int, int],
    size: tuple[int, int] | None,
) -> np.ndarray:
    """Masks (n, H, W) bool; ``None`` entries (normal images) stay all-False."""
    masks = np.zeros((len(image_paths),) + shape, dtype=bool)
    for i, (image_path, mask_path) in enumerate(zip(image_paths, mask_paths, strict=True)):
        if mask_path is not None:
            masks[i] = _read_mask(mask_path, image_path, size)
    return masks


# --------------------------------------------------------------------------
# MVTec AD
# --------------------------------------------------------------------------


@validate_params(
    {
        "root": [str, os.PathLike],
        "category": [str],
        "split": [str, tuple, list, None],
        "image_size": [Interval(Integral, 1, None, closed="left"), tuple, list, None],
        "return_paths": ["boolean"],
    },
    prefer_skip_nested_validation=True,
)
def load_mvtec(root, category: str, *, split=None, image_size=None, return_paths=False) -> Bunch:
    """Load one category of MVTec AD from its official folder layout.

    The layout read is ``root/category/train/good/*.png``,
    ``root/category/test/<defect_type>/*.png`` (``good`` for normal test
    images) and ``root/category/ground_truth/<defect_type>/<name>_mask.png``
    (one per defective test image; nonzero = defect). Normal images get
    all-False masks. A category with no ``ground_truth`` folder at all is
    read in classification (mask-less) mode: labels only, ``test_masks`` is
    None.

    Parameters
    ----------
    root : str or path-like
        Folder holding the category folders.
    category : str
        Category folder name, e.g. ``"bottle"``.
    split : {"train", "test"}, sequence of those, or None, default=None
        Which parts to load; None loads both. Only the keys of the loaded
        parts are set on the result.
    image_size : int, (height, width) or None, default=None
        Resize every image to this size while loading (bicubic for images,
        nearest neighbour for masks, which so stay binary) to bound memory:
        MVTec's 900x900 originals take 2.4 MB each as arrays. None keeps
        the files' size, which must then be the same for all images of a
        split.
    return_paths : bool, default=False
        Leave the images on disk: ``train_images`` and ``test_images`` hold
        their file paths, for :class:`~skpatchcore.ImageReader` to read
        (with the same ``image_size``, it gives the same pixels). Masks are
        still read, at ``image_size`` or the files' common size.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        Dictionary-like object with the following attributes.

        train_images : ndarray of shape (n_train, H, W, 3), uint8
            Defect-free training images, RGB. Grayscale categories (grid,
            screw, zipper) are replicated to three channels, so every
            category feeds the same ImageNet backbones. With
            ``return_paths=True``: shape (n_train,), str, the file paths.
        train_filenames : ndarray of shape (n_train,), str
            Paths of the training images.
        test_images : ndarray of shape (n_test, H, W, 3), uint8
            Test images: the ``good`` ones first, then each defect type in
            alphabetical order, files sorted by name. With
            ``return_paths=True``: shape (n_test,), str, the file paths.
        test_labels : ndarray of shape (n_test,), int64
            0 for good images, 1 for defective ones.
        test_masks : ndarray of shape (n_test, H, W), bool, or None
            Defect masks; all False for good images. None for a category
            without a ``ground_truth`` folder (image-level labels only).
        test_defect_types : ndarray of shape (n_test,), str
            The test sub-folder of each image (``"good"`` or a defect name).
        test_filenames : ndarray of shape (n_test,), str
            Paths of the test images.
        category : str
            The category loaded.
        DESCR : str
            A one-paragraph description of what was loaded.

    Raises
    ------
    FileNotFoundError
        If a folder of the layout is missing or holds no images, or a
        defective image has no mask; the message names the path.
    ValueError
        If an image cannot be read, a mask's size differs from its image's,
        or images differ in size and ``image_size`` is None.

    See Also
    --------
    load_folder : Load your own good/defective image folders.

    References
    ----------
    P. Bergmann, M. Fauser, D. Sattlegger, C. Steger, "MVTec AD — A
    Comprehensive Real-World Dataset for Unsupervised Anomaly Detection",
    CVPR 2019.

    Examples
    --------
    >>> from skpatchcore.datasets import load_mvtec
    >>> data = load_mvtec("mvtec", "bottle", image_size=256)  # doctest: +SKIP
    >>> data.train_images.shape, data.test_masks.shape  # doctest: +SKIP
    ((209, 256, 256, 3), (83, 256, 256))
    """
    size = _size_hw(image_size)
    splits = (
        ("train", "test") if split is None else (split,) if isinstance(split, str) else tuple(split)
    )
    if not splits or any(s not in ("train", "test") for s in splits):
        raise ValueError(
            f"split must be 'train', 'test', a sequence of those or None; got {split!r}."
        )
    base = _check_dir(Path(root) / category, f"MVTec AD category {category!r}")
    data = Bunch(category=category)
    description = [f"MVTec AD category {category!r} read from {base}"]

    if "train" in splits:
        train_files = _list_images(_check_dir(base / "train" / "good", "Training"))
        data.train_images = _load_images(train_files, size, return_paths)[0]
        data.train_filenames = np.array([str(p) for p in train_files])
        description.append(f"{len(train_files)} defect-free training images")

    if "test" in splits:
        test_dir = _check_dir(base / "test", "Test")
        defect_types = sorted(p.name for p in test_dir.iterdir() if p.is_dir())
        # Good images first, as the normal class is the reference.
        if "good" in defect_types:
            defect_types.remove("good")
            defect_types.insert(0, "good")
        if not defect_types:
            raise FileNotFoundError(
                f"No test sub-folders found in {test_dir}: expected 'good' and one "
                "folder per defect type."
            )
        # No ground_truth folder at all: a classification-only category.
        with_masks = (base / "ground_truth").is_dir()
        files, types, mask_files = [], [], []
        for defect in defect_types:
            defect_files = _list_images(test_dir / defect)
            files += defect_files
            types += [defect] * len(defect_files)
            if defect == "good" or not with_masks:
                mask_files += [None] * len(defect_files)
                continue
            mask_dir = _check_dir(base / "ground_truth" / defect, "Ground-truth mask")
            mask_files += [_require_mask(mask_dir, path) for path in defect_files]
        data.test_images, shape = _load_images(files, size, return_paths)
        data.test_labels = np.array([t != "good" for t in types], dtype=np.int64)
        data.test_masks = _read_masks(files, mask_files, shape, size) if with_masks else None
        data.test_defect_types = np.array(types)
        data.test_filenames = np.array([str(p) for p in files])
        description.append(
            f"{len(files)} test images ({int(data.test_labels.sum())} defective; "
            f"types: {', '.join(defect_types)})"
        )
        if not with_masks:
            description.append("no ground_truth folder: image-level labels only")
    if size is not None:
        description.append(f"resized to {size[0]}x{size[1]} (height x width)")
    data.DESCR = "; ".join(description) + "."
    return data


# --------------------------------------------------------------------------
# Generic folders
# --------------------------------------------------------------------------


@validate_params(
    {
        "good_dir": [str, os.PathLike],
        "defect_dir": [str, os.PathLike, None],
        "mask_dir": [str, os.PathLike, None],
        "image_size": [Interval(Integral, 1, None, closed="left"), tuple, list, None],
        "return_paths": ["boolean"],
    },
    prefer_skip_nested_validation=True,
)
def load_folder(
    good_dir, defect_dir=None, mask_dir=None, *, image_size=None, return_paths=False
) -> Bunch:
    """Load your own images: a folder of good ones, optionally defective ones and masks.

    Files directly inside each folder are read (not sub-folders), sorted by
    name, if their name ends in one of :data:`IMAGE_EXTENSIONS`. The mask of
    a defective image ``name.ext`` is the file ``name_mask.*`` or ``name.*``
    in ``mask_dir`` (nonzero = defect), e.g. ``scratch_01.png`` ↔
    ``scratch_01_mask.png``.

    Parameters
    ----------
    good_dir : str or path-like
        Folder of defect-free images (label 0).
    defect_dir : str, path-like or None, default=None
        Folder of defective images (label 1).
    mask_dir : str, path-like or None, default=None
        Folder of masks for the images in ``defect_dir``; every defective
        image must have one. Needs ``defect_dir``.
    image_size : int, (height, width) or None, default=None
        Resize while loading (bicubic for images, nearest for masks). None
        keeps the files' size, which must then be the same for all images.
    return_paths : bool, default=False
        Leave the images on disk: ``images`` holds their file paths, for
        :class:`~skpatchcore.ImageReader` to read (with the same
        ``image_size``, it gives the same pixels). Masks are still read.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        Dictionary-like object with the following attributes.

        images : ndarray of shape (n_images, H, W, 3), uint8
            RGB images, good ones first (grayscale replicated to 3 channels).
            With ``return_paths=True``: shape (n_images,), str, the file paths.
        labels : ndarray of shape (n_images,), int64
            0 for good images, 1 for defective ones.
        masks : ndarray of shape (n_images, H, W), bool, or None
            Defect masks (all False for good images); None without
            ``mask_dir``.
        filenames : ndarray of shape (n_images,), str
            Paths of the images.
        DESCR : str
            A one-line description of what was loaded.

    Raises
    ------
    FileNotFoundError
        If a folder is missing or holds no images, or a defective image has
        no mask in ``mask_dir``; the message names the path.
    ValueError
        If an image cannot be read, a mask's size differs from its image's,
        or images differ in size and ``image_size`` is None.

    See Also
    --------
    load_mvtec : The MVTec AD layout.

    Examples
    --------
    >>> from skpatchcore.datasets import load_folder
    >>> data = load_folder("parts/ok", "parts/defect", "parts/masks",
    ...                    image_size=256)  # doctest: +SKIP
    >>> X_train = data.images[data.labels == 0]  # doctest: +SKIP
    """
    size = _size_hw(image_size)
    if mask_dir is not None and defect_dir is None:
        raise ValueError(
            f"mask_dir ({mask_dir}) needs defect_dir: masks belong to defective images, "
            "and good images get all-False masks."
        )
    good_files = _list_images(_check_dir(good_dir, "Good-image"))
    defect_files = (
        [] if defect_dir is None else _list_images(_check_dir(defect_dir, "Defect-image"))
    )
    files = good_files + defect_files
    images, shape = _load_images(files, size, return_paths)
    labels = np.array([0] * len(good_files) + [1] * len(defect_files), dtype=np.int64)

    masks = None
    if mask_dir is not None:
        mask_root = _check_dir(mask_dir, "Mask")
        mask_files = [None] * len(good_files) + [_require_mask(mask_root, p) for p in defect_files]
        masks = _read_masks(files, mask_files, shape, size)
    return Bunch(
        images=images,
        labels=labels,
        masks=masks,
        filenames=np.array([str(p) for p in files]),
        DESCR=(
            f"{len(good_files)} good images from {good_dir}"
            + (
                f" and {len(defect_files)} defective images from {defect_dir}"
                if defect_files
                else ""
            )
            + (f", masks from {mask_dir}" if mask_dir is not None else "")
            + (f", resized to {size[0]}x{size[1]} (height x width)" if size else "")
            + "."
        ),
    )


# --------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------

# The "product": one fixed texture, so that sets drawn with different seeds
# share the same normal appearance (only phase, lighting and noise vary).
_THREAD_COLOUR = np.array([196.0, 168.0, 128.0])  # beige fabric
_PERIODS_PER_IMAGE = 8.0
_NOISE_STD = 3.0  # grey levels
_STAIN_COLOURS = np.array([[150.0, 20, 20], [20, 50, 160], [30, 120, 40], [100, 30, 130]])


def _texture(rng, n: int, height: int, width: int) -> np.ndarray:
    """Fabric-like periodic texture with random phase, as float32 (n, H, W, 3)."""
    period = max(height, width) / _PERIODS_PER_IMAGE
    phase = rng.uniform(0, period, size=(n, 2))
    u = 2 * np.pi * (np.arange(width) + phase[:, :1]) / period  # (n, W)
    v = 2 * np.pi * (np.arange(height) + phase[:, 1:]) / period  # (n, H)
    su, cu = np.sin(u)[:, None, :], np.cos(u)[:, None, :]
    sv, cv = np.sin(v)[:, :, None], np.cos(v)[:, :, None]
    # Warp and weft threads with a diagonal twill; cos(u + v) and cos(2u) are
    # expanded so that only separable (n, H, 1) x (n, 1, W) products are formed.
    weave = 0.55 + 0.18 * su * sv + 0.12 * (cu * cv - su * sv) + 0.06 * (2 * cu**2 - 1)
    weave *= rng.uniform(0.95, 1.05, size=(n, 1, 1))
    return weave.astype(np.float32)[..., None] * (1.3 * _THREAD_COLOUR).astype(np.float32)


def _defect(rng, height: int, width: int) -> tuple[np.ndarray, str]:
    """One random defect region as a bool mask (H, W), and its kind."""
    scale = min(height, width)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    kind = ("scratch", "spot", "stain")[rng.randint(3)]
    if kind == "scratch":
        length = rng.uniform(0.25, 0.5) * scale
        half_width = max(0.6, rng.uniform(0.012, 0.025) * scale)
        angle = rng.uniform(0, np.pi)
        direction = np.array([np.sin(angle), np.cos(angle)])
        margin = length / 2 + half_width
        centre = rng.uniform(margin, [height - margin, width - margin])
        offset = np.stack([rows - centre[0], cols - centre[1]])
        along = np.tensordot(direction, offset, axes=1)
        across = np.abs(direction[1] * offset[0] - direction[0] * offset[1])
        mask = (np.abs(along) <= length / 2) & (across <= half_width)
    else:
        low, high = (0.06, 0.11) if kind == "spot" else (0.07, 0.14)
        radius = rng.uniform(low, high) * scale
        aspect = 1.0 if kind == "spot" else rng.uniform(0.5, 1.0)
        angle = rng.uniform(0, np.pi)
        centre = rng.uniform(radius + 1, [height - radius - 1, width - radius - 1])
        dr, dc = rows - centre[0], cols - centre[1]
        a = np.cos(angle) * dr + np.sin(angle) * dc
        b = -np.sin(angle) * dr + np.cos(angle) * dc
        mask = (a / radius) ** 2 + (b / (radius * aspect)) ** 2 <= 1.0
    return mask, kind


def _paint(rng, image: np.ndarray, mask: np.ndarray, kind: str) -> None:
    """Draw defect ``kind`` into float ``image`` (H, W, 3) where ``mask`` is True."""
    if kind == "scratch":
        # Light or dark line that cuts through the weave.
        tone = rng.uniform(225, 250) if rng.rand() < 0.5 else rng.uniform(25, 60)
        image[mask] = tone
    elif kind == "spot":
        # Dark, nearly uniform contamination: the weave disappears.
        image[mask] = rng.uniform(20, 60, size=3)
    else:
        # Coloured stain: the weave shows through, its colour changes.
        colour = _STAIN_COLOURS[rng.randint(len(_STAIN_COLOURS))] + rng.uniform(-20, 20, size=3)
        image[mask] = 0.3 * image[mask] + 0.7 * colour


@validate_params(
    {
        "n_samples": [Interval(Integral, 1, None, closed="left")],
        "image_size": [Interval(Integral, 16, None, closed="left"), tuple, list],
        "anomaly_ratio": [Interval(Real, 0, 1, closed="both")],
        "random_state": ["random_state"],
    },
    prefer_skip_nested_validation=True,
)
def make_anomaly_images(
    n_samples: int = 100,
    *,
    image_size: int | tuple[int, int] = 64,
    anomaly_ratio: float = 0.5,
    random_state=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate textured images, some with defects, for tests and demos.

    Every image shows the same fabric-like periodic texture (the "product")
    with a random phase (translation), a slight brightness change and
    Gaussian noise; these are normal variations. Anomalous images carry one
    or two defects of random position and size: a light or dark scratch, a
    dark spot, or a coloured stain. Because the texture is fixed, a training
    set drawn with ``anomaly_ratio=0`` and a test set drawn with another
    ``random_state`` come from the same normal distribution.

    Parameters
    ----------
    n_samples : int, default=100
        Number of images.
    image_size : int or (height, width), default=64
        Image size in pixels, at least 16. Texture and defects scale with it.
    anomaly_ratio : float in [0, 1], default=0.5
        Fraction of anomalous images; exactly ``round(anomaly_ratio *
        n_samples)`` are, at random positions in the set.
    random_state : int, RandomState instance or None, default=None
        Seed for reproducible output across calls.

    Returns
    -------
    X : ndarray of shape (n_samples, height, width, 3), uint8
        RGB images.
    y : ndarray of shape (n_samples,), int64
        1 for anomalous images, 0 for normal ones.
    masks : ndarray of shape (n_samples, height, width), bool
        Defect pixels; all False for normal images, never empty for
        anomalous ones.

    See Also
    --------
    load_mvtec : Real industrial images.

    Examples
    --------
    >>> from skpatchcore.datasets import make_anomaly_images
    >>> X, y, masks = make_anomaly_images(10, image_size=32, anomaly_ratio=0.3,
    ...                                   random_state=0)
    >>> X.shape, X.dtype, int(y.sum()), masks.shape
    ((10, 32, 32, 3), dtype('uint8'), 3, (10, 32, 32))
    >>> bool((masks.any(axis=(1, 2)) == y).all())
    True
    """
    height, width = _size_hw(image_size)
    if min(height, width) < 16:
        raise ValueError(f"image_size must be at least 16 pixels; got {image_size!r}.")
    rng = check_random_state(random_state)
    n_anomalous = int(round(anomaly_ratio * n_samples))
    y = np.zeros(n_samples, dtype=np.int64)
    y[rng.permutation(n_samples)[:n_anomalous]] = 1

    images = _texture(rng, n_samples, height, width)
    masks = np.zeros((n_samples, height, width), dtype=bool)
    for i in np.flatnonzero(y):
        for _ in range(1 + (rng.rand() < 0.3)):
            mask, kind = _defect(rng, height, width)
            _paint(rng, images[i], mask, kind)
            masks[i] |= mask
    images += rng.normal(0.0, _NOISE_STD, size=images.shape).astype(np.float32)
    X = np.clip(np.rint(images, out=images), 0, 255, out=images).astype(np.uint8)
    return X, y, masks
