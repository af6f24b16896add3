import numpy as np
import pytest
import torch

from skpatchcore.images import (
    check_images,
    common_size_images,
    crop_box,
    resized_shape,
    size_groups,
    to_model_input,
)


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


def test_area_rule_gives_about_image_size_squared_pixels_and_keeps_the_aspect_ratio():
    # KolektorSDD's 256 x 640 files at 512: 324 x 810 (262,440 pixels against 512^2 = 262,144).
    assert resized_shape((256, 640), 512, "area") == (324, 810)
    assert resized_shape((640, 256), 512, "area") == (810, 324)
    assert resized_shape((384, 384), 512, "area") == resized_shape((384, 384), 512) == (512, 512)
    # Pairs and None are taken as they are.
    assert resized_shape((100, 300), (20, 30), "area") == (20, 30)
    assert resized_shape((100, 300), None, "area") == (100, 300)


def test_common_size_images_follows_the_size_rule():
    X = [np.zeros((40, 100, 3), np.uint8), np.zeros((20, 50, 3), np.uint8)]
    assert common_size_images(X, 32).shape == (2, 32, 80, 3)
    assert common_size_images(X, 32, rule="area").shape == (2, 20, 51, 3)


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


def test_gray_resized_is_the_rgb_replica_resized():
    gray = np.random.RandomState(0).randint(0, 256, (2, 20, 30, 1)).astype(np.uint8)
    for size, box in (((13, 17), (1, 2, 10, 12)), ((40, 60), (0, 0, 40, 60))):
        batch = to_model_input(gray, size, box, "cpu")
        expected = to_model_input(np.repeat(gray, 3, axis=-1), size, box, "cpu")
        assert batch.is_contiguous()
        torch.testing.assert_close(batch, expected, rtol=0, atol=0)


@pytest.mark.parametrize("size", [(13, 17), (40, 60), (13, 60)])
def test_model_input_resizes_as_antialiased_bilinear(size):
    # Shrinking needs the antialiasing filter; enlarging skips it, which changes
    # nothing but float32 rounding.
    rgb = np.random.RandomState(0).randint(0, 256, (2, 20, 30, 3)).astype(np.uint8)
    source = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255.0
    antialiased = torch.nn.functional.interpolate(source, size=size, mode="bilinear", antialias=True)
    batch = to_model_input(rgb, size, (0, 0, *size), "cpu")
    torch.testing.assert_close(batch, antialiased.clamp(0, 1), rtol=0, atol=1e-5)
    if size[0] < 20:  # the plain kernel would be visibly different here
        plain = torch.nn.functional.interpolate(source, size=size, mode="bilinear")
        assert float((plain - antialiased).abs().max()) > 1e-2


def test_uint16_is_read_over_the_full_16_bit_range():
    X = np.array([[[0, 65535], [32768, 1000]]], dtype=np.uint16)
    out = check_images(X)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[..., 0], X / 65535.0, rtol=1e-6)


def test_single_rgb_image_is_refused_with_the_way_to_pass_it():
    with pytest.raises(ValueError, match=r"X\[np.newaxis\]"):
        check_images(np.zeros((64, 48, 3), dtype=np.uint8))


def test_object_array_of_non_numbers_is_named():
    with pytest.raises(TypeError, match="arrays of numbers"):
        check_images(np.array([[[{}, None]]], dtype=object))


def test_read_only_batch_converts_without_torch_warning():
    import warnings

    X = np.zeros((1, 4, 4, 3), dtype=np.uint8)
    X.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = to_model_input(X, (4, 4), (0, 0, 4, 4), "cpu")
    assert batch.shape == (1, 3, 4, 4)


def test_size_groups_splits_a_mixed_list_by_shape():
    X = [np.zeros((4, 5, 3)), np.zeros((6, 5, 3)), np.zeros((4, 5, 3))]
    groups = size_groups(X)
    assert [list(positions) for positions, _ in groups] == [[0, 2], [1]]
    assert size_groups([np.zeros((4, 5, 3))] * 2) is None


def test_common_size_images_resizes_a_mixed_list_like_the_network_input():
    rng = np.random.RandomState(0)
    X = [rng.randint(0, 256, (40, 40, 3)).astype(np.uint8), rng.randint(0, 256, (20, 20, 3)).astype(np.uint8)]
    out = common_size_images(X, 32)
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.float32
    expected = to_model_input(X[1][None], (32, 32), (0, 0, 32, 32), "cpu")[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(out[1], expected)


def test_common_size_images_needs_one_network_size():
    X = [np.zeros((40, 60, 3), np.uint8), np.zeros((40, 40, 3), np.uint8)]
    with pytest.raises(ValueError, match=r"image_size=\(height, width\)"):
        common_size_images(X, 32)
    assert common_size_images(X, (32, 32)).shape == (2, 32, 32, 3)


def test_rows_reshaped_by_image_shape_are_not_ambiguous():
    assert check_images(np.zeros((2, 3)), image_shape=(1, -1)).shape == (2, 1, 3, 1)


def test_float64_beyond_float32_range_is_refused_without_overflow_warning():
    # Found by tests/test_boundary.py: the cast to float32 used to come first.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            check_images(np.full((1, 2, 2), 1e300))
