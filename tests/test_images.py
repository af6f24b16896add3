import numpy as np
import pytest

from skpatchcore.images import check_images, crop_box, resized_shape, to_model_input


def test_uint8_rgb_passes_through_without_copy():
    X = np.zeros((2, 5, 7, 3), dtype=np.uint8)
    out = check_images(X)
    assert out.shape == (2, 5, 7, 3)
    assert np.shares_memory(out, X)


def test_grayscale_gets_a_channel_axis():
    assert check_images(np.zeros((2, 5, 7), dtype=np.uint8)).shape == (2, 5, 7, 1)


def test_flat_rows_are_reshaped_with_image_shape():
    X = np.arange(2 * 4 * 6 * 3).reshape(2, -1) % 256
    out = check_images(X, image_shape=(4, 6, 3))
    assert out.shape == (2, 4, 6, 3)
    assert out.dtype == np.uint8
    assert out[1, 0, 0, 0] == X[1, 0]


def test_flat_rows_without_image_shape_are_rejected():
    with pytest.raises(ValueError, match="image_shape"):
        check_images(np.zeros((2, 12)))


def test_flat_rows_of_wrong_length_are_rejected():
    with pytest.raises(ValueError, match="cannot be reshaped"):
        check_images(np.zeros((2, 13)), image_shape=(2, 2, 3))


@pytest.mark.parametrize("channels", [2, 4])
def test_two_or_four_channels_are_rejected(channels):
    with pytest.raises(ValueError, match=f"got {channels}"):
        check_images(np.zeros((1, 4, 4, channels), dtype=np.uint8))


@pytest.mark.parametrize("shape", [(4,), (1, 2, 3, 3, 3)])
def test_wrong_ndim_is_rejected(shape):
    with pytest.raises(ValueError, match="dimension"):
        check_images(np.zeros(shape, dtype=np.uint8))


def test_empty_is_rejected():
    with pytest.raises(ValueError, match="0 images"):
        check_images(np.zeros((0, 4, 4, 3), dtype=np.uint8))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_floats_are_rejected(bad):
    X = np.zeros((1, 4, 4, 3), dtype=np.float32)
    X[0, 1, 1, 1] = bad
    with pytest.raises(ValueError, match="NaN or infinity"):
        check_images(X)


@pytest.mark.parametrize("value", [-0.1, 1.5, 255.0])
def test_out_of_range_floats_are_rejected(value):
    X = np.full((1, 4, 4, 3), value)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_images(X)


def test_out_of_range_integers_are_rejected():
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        check_images(np.full((1, 4, 4, 3), 300, dtype=np.int32))


def test_int32_in_range_becomes_uint8():
    out = check_images(np.full((1, 4, 4, 3), 200, dtype=np.int64))
    assert out.dtype == np.uint8 and out.max() == 200


@pytest.mark.parametrize("X", [np.zeros((1, 4, 4, 3), dtype=bool), np.array([[["a"]]])])
def test_non_numeric_dtypes_are_rejected(X):
    with pytest.raises(TypeError, match="dtype"):
        check_images(X)


def test_int_image_size_sets_the_shorter_side():
    assert resized_shape((100, 300), 50) == (50, 150)
    assert resized_shape((100, 300), (20, 30)) == (20, 30)
    assert resized_shape((100, 300), None) == (100, 300)


def test_crop_box_is_centred_and_checked():
    assert crop_box((10, 20), 4) == (3, 8, 4, 4)
    assert crop_box((10, 20), None) == (0, 0, 10, 20)
    with pytest.raises(ValueError, match="larger"):
        crop_box((10, 20), 12)


def test_model_input_scales_uint8_and_replicates_gray():
    images = np.full((2, 6, 6, 1), 255, dtype=np.uint8)
    batch = to_model_input(images, (6, 6), (0, 0, 6, 6), "cpu")
    assert batch.shape == (2, 3, 6, 6)
    assert float(batch.min()) == float(batch.max()) == 1.0
