import pickle

import joblib
import numpy as np
import pytest
from PIL import Image
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.pipeline import make_pipeline

from skpatchcore import ImageReader, PatchCoreDetector
from skpatchcore.datasets import load_folder
from skpatchcore.metrics import image_auroc_scorer


def _save(folder, name, array):
    path = folder / name
    Image.fromarray(array).save(path)
    return str(path)


@pytest.fixture
def texture_files(tmp_path, textures):
    """The conftest textures as PNG files: 16 normal, then 6 defective."""
    normal, defective, _ = textures
    images = (np.concatenate([normal, defective]) * 255).round().astype(np.uint8)
    paths = [_save(tmp_path, f"{i:02d}.png", image) for i, image in enumerate(images)]
    labels = np.array([0] * len(normal) + [1] * len(defective))
    return paths, images, labels


def test_reads_png_as_the_saved_uint8_pixels(texture_files):
    paths, images, _ = texture_files
    out = ImageReader().fit_transform(paths)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, images)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tif"])
def test_reads_each_format_as_rgb(tmp_path, suffix):
    image = np.full((8, 10, 3), 120, dtype=np.uint8)
    path = _save(tmp_path, "a" + suffix, image)
    out = ImageReader().transform([path])
    assert out.shape == (1, 8, 10, 3)
    assert np.abs(out.astype(int) - 120).max() <= 2  # JPEG is lossy


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grayscale_scales_by_full_range_to_float(tmp_path, suffix):
    values = np.array([[0, 1000], [32768, 65535]], dtype=np.uint16)
    path = _save(tmp_path, "deep" + suffix, values)
    out = ImageReader(color="gray").transform([path])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], values / 65535.0, rtol=1e-6)


def test_16_bit_and_8_bit_together_give_float_in_unit_range(tmp_path):
    deep = _save(tmp_path, "deep.png", np.full((4, 4), 65535, dtype=np.uint16))
    flat = _save(tmp_path, "flat.png", np.full((4, 4), 51, dtype=np.uint8))
    out = ImageReader().transform([deep, flat])
    assert out.dtype == np.float32 and out.shape == (2, 4, 4, 3)
    np.testing.assert_allclose(out[:, 0, 0, 0], [1.0, 0.2], rtol=1e-6)


def test_gray_colour_mode_drops_channels(texture_files):
    paths, images, _ = texture_files
    out = ImageReader(color="gray").transform(paths[:2])
    assert out.shape == (2, 32, 32)
    # The textures are gray already: luma equals any channel up to rounding.
    assert np.abs(out.astype(int) - images[:2, ..., 0]).max() <= 1


def test_resize_matches_the_folder_loader(tmp_path):
    rng = np.random.RandomState(0)
    for i, shape in enumerate([(20, 30, 3), (25, 25, 3)]):
        _save(tmp_path, f"{i}.png", rng.randint(0, 256, shape).astype(np.uint8))
    loaded = load_folder(tmp_path, image_size=(16, 12))
    out = ImageReader(image_size=(16, 12)).transform(loaded.filenames)
    np.testing.assert_array_equal(out, loaded.images)


def test_different_sizes_without_image_size_say_how_to_fix(tmp_path):
    a = _save(tmp_path, "a.png", np.zeros((8, 8, 3), dtype=np.uint8))
    b = _save(tmp_path, "b.png", np.zeros((8, 9, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"b\.png is 9x8.*ImageReader\(image_size="):
        ImageReader().transform([a, b])


def test_unreadable_file_error_names_the_file(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        ImageReader().transform([str(broken)])


def test_missing_file_error_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        ImageReader().transform([str(tmp_path / "missing.png")])


def test_pixel_arrays_are_refused_with_a_pointer(textures):
    with pytest.raises(TypeError, match="file paths"):
        ImageReader().transform(textures[0])


def test_is_stateless_in_its_tags():
    tags = ImageReader().__sklearn_tags__()
    assert tags.requires_fit is False and tags.input_tags.string


@pytest.fixture
def pipeline(tiny_params):
    return make_pipeline(ImageReader(), PatchCoreDetector(**tiny_params))


def test_pipeline_on_paths_matches_the_detector_on_arrays(pipeline, texture_files, tiny_params):
    paths, images, _ = texture_files
    pipeline.fit(paths[6:16])
    direct = PatchCoreDetector(**tiny_params).fit(images[6:16])
    np.testing.assert_array_equal(pipeline.predict(paths), direct.predict(images))
    np.testing.assert_allclose(pipeline.score_samples(paths), direct.score_samples(images))


def test_pipeline_clone_and_joblib_round_trip(pipeline, texture_files, tmp_path):
    paths, _, _ = texture_files
    fitted = clone(pipeline).fit(paths[6:16])
    joblib.dump(fitted, tmp_path / "pipe.joblib")
    loaded = joblib.load(tmp_path / "pipe.joblib")
    np.testing.assert_array_equal(loaded.score_samples(paths), fitted.score_samples(paths))
    assert pickle.loads(pickle.dumps(loaded)).predict(paths[:2]).shape == (2,)


def test_grid_search_splits_path_lists(pipeline, texture_files):
    paths, _, labels = texture_files
    search = GridSearchCV(
        pipeline,
        {"patchcoredetector__coreset_ratio": [0.1, 0.5]},
        scoring=image_auroc_scorer,
        cv=KFold(2, shuffle=True, random_state=0),
    ).fit(paths, labels)
    assert search.best_score_ > 0.9
    assert search.predict(paths[-6:]).tolist() == [-1] * 6


def test_load_folder_returns_paths_that_read_to_the_same_images(tmp_path, texture_files):
    paths, _, _ = texture_files
    folder = tmp_path
    as_arrays = load_folder(folder, image_size=16)
    as_paths = load_folder(folder, image_size=16, return_paths=True)
    assert as_paths.images.tolist() == sorted(paths)
    np.testing.assert_array_equal(ImageReader(image_size=16).transform(as_paths.images), as_arrays.images)
