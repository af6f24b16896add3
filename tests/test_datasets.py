"""Tests of skpatchcore.datasets: loaders on tiny folders written here, and the generator."""

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skpatchcore import ImageReader
from skpatchcore.datasets import load_folder, load_mvtec, make_anomaly_images

from .conftest import require_mvtec

REAL_MVTEC = Path(__file__).parents[2] / "shared" / "data" / "mvtec"


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _write_mvtec(root: Path, category="widget", size=24, n_train=3, n_good=2, defects=None):
    """Write an MVTec-layout category; return the test images and masks written."""
    defects = {"scratch": 2, "hole": 1} if defects is None else defects
    n_defect = sum(defects.values())
    X, _, _ = make_anomaly_images(
        n_train + n_good, image_size=size, anomaly_ratio=0, random_state=0
    )
    Xd, _, masks = make_anomaly_images(n_defect, image_size=size, anomaly_ratio=1, random_state=1)
    base = root / category
    for i in range(n_train):
        _save(base / "train" / "good" / f"{i:03d}.png", X[i])
    for i in range(n_good):
        _save(base / "test" / "good" / f"{i:03d}.png", X[n_train + i])
    k = 0
    for defect, count in defects.items():
        for i in range(count):
            _save(base / "test" / defect / f"{i:03d}.png", Xd[k])
            _save(
                base / "ground_truth" / defect / f"{i:03d}_mask.png",
                masks[k].astype(np.uint8) * 255,
            )
            k += 1
    return base, Xd, masks


# --------------------------------------------------------------------- MVTec


def test_load_mvtec_reads_the_official_layout(tmp_path):
    base, Xd, masks = _write_mvtec(tmp_path)
    data = load_mvtec(tmp_path, "widget")
    assert data.category == "widget"
    assert data.train_images.shape == (3, 24, 24, 3) and data.train_images.dtype == np.uint8
    assert data.test_images.shape == (5, 24, 24, 3)
    # Good images first, then defect types alphabetically.
    assert data.test_defect_types.tolist() == ["good", "good", "hole", "scratch", "scratch"]
    assert data.test_labels.tolist() == [0, 0, 1, 1, 1]
    assert data.test_masks.shape == (5, 24, 24) and data.test_masks.dtype == bool
    # PNG is lossless: the pixels and masks are those written.
    np.testing.assert_array_equal(data.test_images[2], Xd[2])  # hole/000.png
    np.testing.assert_array_equal(data.test_masks[3:], masks[:2])  # scratch/00{0,1}
    assert data.test_filenames[2] == str(base / "test" / "hole" / "000.png")
    assert data.train_filenames.tolist() == [
        str(base / "train" / "good" / f"{i:03d}.png") for i in range(3)
    ]
    assert "3 defect-free training images" in data.DESCR


def test_load_mvtec_labels_agree_with_masks(tmp_path):
    _write_mvtec(tmp_path)
    data = load_mvtec(tmp_path, "widget")
    np.testing.assert_array_equal(data.test_masks.any(axis=(1, 2)), data.test_labels == 1)


@pytest.mark.parametrize(
    "split, keys",
    [
        ("train", {"train_images", "train_filenames"}),
        (
            "test",
            {"test_images", "test_labels", "test_masks", "test_defect_types", "test_filenames"},
        ),
    ],
)
def test_load_mvtec_split_loads_only_that_part(tmp_path, split, keys):
    _write_mvtec(tmp_path)
    data = load_mvtec(tmp_path, "widget", split=split)
    assert set(data) == keys | {"category", "DESCR"}


def test_load_mvtec_both_splits_by_default_or_as_tuple(tmp_path):
    _write_mvtec(tmp_path)
    assert set(load_mvtec(tmp_path, "widget")) == set(
        load_mvtec(tmp_path, "widget", split=("train", "test"))
    )


def test_load_mvtec_rejects_unknown_split(tmp_path):
    _write_mvtec(tmp_path)
    with pytest.raises(ValueError, match=r"split must be 'train', 'test'.*got 'val'"):
        load_mvtec(tmp_path, "widget", split="val")


@pytest.mark.parametrize("image_size, shape", [(12, (12, 12)), ((8, 16), (8, 16))])
def test_load_mvtec_resizes_images_and_masks(tmp_path, image_size, shape):
    _write_mvtec(tmp_path)
    data = load_mvtec(tmp_path, "widget", image_size=image_size)
    assert data.train_images.shape == (3, *shape, 3)
    assert data.test_images.shape == (5, *shape, 3)
    assert data.test_masks.shape == (5, *shape) and data.test_masks.dtype == bool
    assert "resized to" in data.DESCR


def test_load_mvtec_resizes_masks_with_nearest_neighbour(tmp_path):
    mask = np.zeros((24, 24), dtype=np.uint8)
    mask[:12, :12] = 255
    base, _, _ = _write_mvtec(tmp_path, defects={"scratch": 1})
    _save(base / "ground_truth" / "scratch" / "000_mask.png", mask)
    data = load_mvtec(tmp_path, "widget", image_size=6)
    expected = np.zeros((6, 6), dtype=bool)
    expected[:3, :3] = True
    np.testing.assert_array_equal(data.test_masks[-1], expected)


def test_load_mvtec_replicates_grayscale_to_rgb(tmp_path):
    base, _, _ = _write_mvtec(tmp_path)
    gray = np.arange(24 * 24, dtype=np.uint8).reshape(24, 24)
    _save(base / "train" / "good" / "000.png", gray)
    data = load_mvtec(tmp_path, "widget", split="train")
    for channel in range(3):
        np.testing.assert_array_equal(data.train_images[0, ..., channel], gray)


def test_load_mvtec_missing_category_names_the_path(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=f"folder not found.*{re.escape(str(tmp_path / 'nothing'))}"
    ):
        load_mvtec(tmp_path, "nothing")


def test_load_mvtec_missing_ground_truth_names_the_path(tmp_path):
    base, _, _ = _write_mvtec(tmp_path)
    for path in (base / "ground_truth" / "hole").iterdir():
        path.unlink()
    (base / "ground_truth" / "hole").rmdir()
    with pytest.raises(
        FileNotFoundError, match=f"{re.escape(str(base / 'ground_truth' / 'hole'))}"
    ):
        load_mvtec(tmp_path, "widget")


def test_load_mvtec_without_ground_truth_folder_is_image_level_only(tmp_path):
    base, _, _ = _write_mvtec(tmp_path)
    for path in sorted((base / "ground_truth").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (base / "ground_truth").rmdir()
    data = load_mvtec(tmp_path, "widget")
    assert data.test_masks is None
    assert data.test_labels.tolist() == [0, 0, 1, 1, 1]
    assert "image-level labels only" in data.DESCR


def test_load_mvtec_missing_mask_names_the_image(tmp_path):
    base, _, _ = _write_mvtec(tmp_path)
    (base / "ground_truth" / "scratch" / "001_mask.png").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"No mask found for defective image .*scratch/001\.png"
    ):
        load_mvtec(tmp_path, "widget")


def test_load_mvtec_empty_folder_says_no_images(tmp_path):
    base, _, _ = _write_mvtec(tmp_path)
    for path in (base / "train" / "good").iterdir():
        path.unlink()
    (base / "train" / "good" / "notes.txt").write_text("not an image")
    with pytest.raises(
        FileNotFoundError, match=f"No images found in {re.escape(str(base / 'train' / 'good'))}"
    ):
        load_mvtec(tmp_path, "widget")


def test_unreadable_image_names_the_file(tmp_path):
    base, _, _ = _write_mvtec(tmp_path)
    broken = base / "test" / "good" / "001.png"
    broken.write_bytes(b"definitely not a PNG")
    with pytest.raises(ValueError, match=f"Cannot read image file {re.escape(str(broken))}"):
        load_mvtec(tmp_path, "widget")


def test_mask_size_mismatch_names_both_files(tmp_path):
    base, _, _ = _write_mvtec(tmp_path)
    mask = base / "ground_truth" / "hole" / "000_mask.png"
    _save(mask, np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(
        ValueError,
        match=f"Mask {re.escape(str(mask))} is 10x10 but its image .*hole/000.png is 24x24",
    ):
        load_mvtec(tmp_path, "widget", image_size=8)


def test_images_of_different_sizes_need_image_size(tmp_path):
    base, _, _ = _write_mvtec(tmp_path)
    odd = base / "train" / "good" / "002.png"
    _save(odd, np.zeros((30, 20, 3), dtype=np.uint8))
    with pytest.raises(
        ValueError, match=f"{re.escape(str(odd))} is 20x30 but .*000.png is 24x24.*Pass image_size"
    ):
        load_mvtec(tmp_path, "widget", split="train")
    assert load_mvtec(tmp_path, "widget", split="train", image_size=16).train_images.shape == (
        3,
        16,
        16,
        3,
    )


# -------------------------------------------------------------------- folders


def _write_folders(tmp_path, mask_suffix="_mask"):
    X, y, masks = make_anomaly_images(5, image_size=20, anomaly_ratio=0.4, random_state=3)
    good, defect, mask_dir = tmp_path / "ok", tmp_path / "ng", tmp_path / "masks"
    for i in np.flatnonzero(y == 0):
        _save(good / f"part{i}.png", X[i])
    for i in np.flatnonzero(y == 1):
        _save(defect / f"part{i}.png", X[i])
        _save(mask_dir / f"part{i}{mask_suffix}.png", masks[i].astype(np.uint8) * 255)
    order = np.concatenate([np.flatnonzero(y == 0), np.flatnonzero(y == 1)])
    return (good, defect, mask_dir), X[order], masks[order]


@pytest.mark.parametrize("mask_suffix", ["_mask", ""])
def test_load_folder_matches_masks_by_stem(tmp_path, mask_suffix):
    dirs, X, masks = _write_folders(tmp_path, mask_suffix)
    data = load_folder(*dirs)
    np.testing.assert_array_equal(data.images, X)
    np.testing.assert_array_equal(data.masks, masks)
    assert data.labels.tolist() == [0, 0, 0, 1, 1]
    assert Path(data.filenames[3]).parent == dirs[1]


def test_load_folder_without_masks_or_defects(tmp_path):
    (good, defect, _), X, _ = _write_folders(tmp_path)
    data = load_folder(good, defect)
    assert data.masks is None and data.labels.tolist() == [0, 0, 0, 1, 1]
    data = load_folder(good, image_size=(10, 12))
    assert data.images.shape == (3, 10, 12, 3) and data.labels.tolist() == [0, 0, 0]


def test_load_folder_mask_dir_needs_defect_dir(tmp_path):
    (good, _, mask_dir), _, _ = _write_folders(tmp_path)
    with pytest.raises(ValueError, match="mask_dir .* needs defect_dir"):
        load_folder(good, mask_dir=mask_dir)


def test_load_folder_missing_mask_names_the_image(tmp_path):
    (good, defect, mask_dir), _, _ = _write_folders(tmp_path)
    next(mask_dir.iterdir()).unlink()
    with pytest.raises(
        FileNotFoundError, match=f"No mask found for defective image {re.escape(str(defect))}"
    ):
        load_folder(good, defect, mask_dir)


def test_load_folder_missing_folder_names_the_path(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=f"Good-image folder not found.*{re.escape(str(tmp_path / 'nope'))}"
    ):
        load_folder(tmp_path / "nope")


# ------------------------------------------------------------------ generator


def test_make_anomaly_images_shapes_and_dtypes():
    X, y, masks = make_anomaly_images(12, image_size=(32, 48), anomaly_ratio=0.25, random_state=0)
    assert X.shape == (12, 32, 48, 3) and X.dtype == np.uint8
    assert y.shape == (12,) and y.dtype == np.int64
    assert masks.shape == (12, 32, 48) and masks.dtype == bool
    assert y.sum() == 3


def test_make_anomaly_images_is_deterministic_under_random_state():
    first = make_anomaly_images(6, image_size=32, random_state=7)
    second = make_anomaly_images(6, image_size=32, random_state=7)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    other = make_anomaly_images(6, image_size=32, random_state=8)
    assert not np.array_equal(first[0], other[0])


def test_make_anomaly_images_masks_agree_with_labels():
    X, y, masks = make_anomaly_images(60, image_size=32, anomaly_ratio=0.5, random_state=1)
    np.testing.assert_array_equal(masks.any(axis=(1, 2)), y == 1)
    # Defects are local: a few percent of the image, never all of it.
    area = masks[y == 1].mean(axis=(1, 2))
    assert area.min() > 0 and area.max() < 0.2


def test_make_anomaly_images_defects_change_the_pixels():
    # With one seed, the textures are drawn before the defects (and the noise
    # after), so an all-normal set shows what lay under each defect.
    X, y, masks = make_anomaly_images(20, image_size=32, anomaly_ratio=0.5, random_state=2)
    clean, _, _ = make_anomaly_images(20, image_size=32, anomaly_ratio=0.0, random_state=2)
    diff = np.abs(X.astype(float) - clean).mean(axis=-1)
    assert diff[masks].mean() > 30  # grey levels
    assert diff[~masks].mean() < 5  # noise only


def test_make_anomaly_images_normal_sets_share_one_texture():
    # Different seeds must draw from the same normal distribution.
    a, _, _ = make_anomaly_images(30, image_size=32, anomaly_ratio=0, random_state=0)
    b, _, _ = make_anomaly_images(30, image_size=32, anomaly_ratio=0, random_state=1)
    np.testing.assert_allclose(a.mean(axis=(0, 1, 2)), b.mean(axis=(0, 1, 2)), atol=3)
    np.testing.assert_allclose(a.std(axis=(0, 1, 2)), b.std(axis=(0, 1, 2)), atol=3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_samples": 0}, "n_samples"),
        ({"anomaly_ratio": 1.5}, "anomaly_ratio"),
        ({"image_size": 8}, "image_size"),
        ({"image_size": (32, 8)}, "at least 16 pixels"),
    ],
)
def test_make_anomaly_images_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_anomaly_images(**{"n_samples": 4, **kwargs})


# ------------------------------------------------------------------ real data


@pytest.mark.realdata
def test_real_mvtec_bottle_matches_the_readme_counts():
    if not (REAL_MVTEC / "bottle").is_dir():
        pytest.skip(
            f"real MVTec AD data not found at {REAL_MVTEC / 'bottle'} (CI and dev machines only)"
        )
    data = load_mvtec(REAL_MVTEC, "bottle", image_size=64)
    assert data.train_images.shape == (209, 64, 64, 3)
    assert data.test_images.shape == (83, 64, 64, 3)
    assert int(data.test_labels.sum()) == 63
    assert sorted(set(data.test_defect_types)) == [
        "broken_large",
        "broken_small",
        "contamination",
        "good",
    ]
    np.testing.assert_array_equal(data.test_masks.any(axis=(1, 2)), data.test_labels == 1)


def test_load_mvtec_paths_mode_keeps_masks_and_reads_back_the_same_pixels():
    root = require_mvtec("bottle")
    arrays = load_mvtec(root, "bottle", split="test", image_size=32)
    paths = load_mvtec(root, "bottle", split="test", image_size=32, return_paths=True)
    assert paths.test_images.shape == (len(arrays.test_images),)
    np.testing.assert_array_equal(paths.test_masks, arrays.test_masks)
    np.testing.assert_array_equal(ImageReader(image_size=32).transform(paths.test_images), arrays.test_images)
