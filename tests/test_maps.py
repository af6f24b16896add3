import torch

from skpatchcore.maps import anomaly_maps


def test_hot_patch_lands_on_its_pixels():
    scores = torch.zeros(1, 4, 4)
    scores[0, 1, 2] = 1.0  # rows 8-15, columns 16-23 of a 32x32 input
    maps = anomaly_maps(scores, model_size=(32, 32), box=(0, 0, 32, 32), output_size=(32, 32), sigma=0)
    row, col = divmod(int(maps[0].argmax()), 32)
    assert 8 <= row < 16 and 16 <= col < 24


def test_maps_follow_the_input_resolution_and_aspect():
    scores = torch.zeros(1, 4, 8)
    scores[0, 3, 0] = 1.0  # bottom-left patch
    maps = anomaly_maps(scores, model_size=(32, 64), box=(0, 0, 32, 64), output_size=(96, 192), sigma=4)
    assert maps.shape == (1, 96, 192)
    row, col = divmod(int(maps[0].argmax()), 192)
    assert row >= 72 and col < 24


def test_smoothing_keeps_mass_and_lowers_the_peak():
    scores = torch.zeros(1, 8, 8)
    scores[0, 4, 4] = 1.0
    sharp = anomaly_maps(scores, model_size=(64, 64), box=(0, 0, 64, 64), output_size=(64, 64), sigma=0)
    smooth = anomaly_maps(scores, model_size=(64, 64), box=(0, 0, 64, 64), output_size=(64, 64), sigma=4)
    assert smooth.max() < sharp.max()
    assert torch.isclose(smooth.sum(), sharp.sum(), rtol=0.02)


def test_outside_a_centre_crop_is_zero():
    scores = torch.ones(1, 2, 2)
    maps = anomaly_maps(scores, model_size=(20, 20), box=(4, 4, 12, 12), output_size=(20, 20), sigma=0)
    assert float(maps[0, :4].abs().max()) == 0.0
    assert torch.allclose(maps[0, 4:16, 4:16], torch.ones(12, 12))


def test_separable_blur_equals_torchvisions_2d_gaussian_blur():
    from torchvision.transforms.v2.functional import gaussian_blur as reference

    from skpatchcore.maps import gaussian_blur

    maps = torch.rand(3, 1, 40, 56, generator=torch.Generator().manual_seed(0))
    for sigma, radius in ((4.0, 16), (1.5, 6), (4.0, 5)):
        want = reference(maps, kernel_size=[2 * radius + 1] * 2, sigma=[sigma, sigma])
        torch.testing.assert_close(gaussian_blur(maps, sigma, radius), want, rtol=1e-5, atol=1e-6)
