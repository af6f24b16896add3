"""Tiled feature extraction: layout, stitching, and full-resolution detection."""

import numpy as np
import pytest
import torch

from skpatchcore import ModuleExtractor, PatchCoreDetector
from skpatchcore.features import extract_patch_features
from skpatchcore.tiling import iter_tiled_patch_embeddings, tile_layout

from .conftest import tiny_cnn


def _stripes(rng, n, height, width):
    """Grey vertical stripes of random phase with a little noise, float (n, H, W, 3)."""
    xx = np.arange(width)[None, :]
    images = []
    for _ in range(n):
        stripes = 0.5 + 0.25 * np.sin(xx / 6.0 + rng.uniform(0, 2 * np.pi))
        stripes = stripes + rng.normal(0, 0.02, (height, width))
        images.append(np.repeat(stripes[..., None], 3, axis=2))
    return np.clip(np.stack(images), 0, 1).astype(np.float32)


def test_tile_layout_partitions_the_grid_at_the_overlaps_middle():
    # 64 cells, tiles of 32 cells, step 24: starts 0, 24 and 32 (the last ends at the end).
    assert tile_layout(512, 256, 64, 8) == [(0, 0, 28), (24, 28, 44), (32, 44, 64)]


def test_tile_layout_is_one_tile_when_the_image_fits():
    assert tile_layout(128, 128, 32, 8) == [(0, 0, 16)]


def test_tiled_grid_equals_the_whole_image_grid_when_the_overlap_covers_the_receptive_field():
    images = _stripes(np.random.RandomState(0), 2, 96, 160)  # not square, not a tile multiple
    extractor = ModuleExtractor(tiny_cnn(), ["layer1", "layer2"])
    whole = extract_patch_features(extractor, images, image_size=None)
    tiled = extract_patch_features(extractor, images, image_size=None, tile_size=64, tile_overlap=48)
    assert tiled.shape == whole.shape == (2, 24, 40, 48)
    np.testing.assert_array_equal(tiled, whole)


def test_tiles_without_overlap_differ_at_the_seams():
    # The control for the test above: tile borders do change the features.
    images = _stripes(np.random.RandomState(0), 1, 96, 160)
    extractor = ModuleExtractor(tiny_cnn(), ["layer1", "layer2"])
    whole = extract_patch_features(extractor, images, image_size=None)
    tiled = extract_patch_features(extractor, images, image_size=None, tile_size=64, tile_overlap=0)
    assert np.abs(tiled - whole).max() > 1e-3


def test_the_network_sees_at_most_batch_size_tiles_of_tile_size():
    seen = []
    net = ModuleExtractor(tiny_cnn(), ["layer1", "layer2"]).load()
    net.register_forward_pre_hook(lambda _module, args: seen.append(tuple(args[0].shape)))
    images = (_stripes(np.random.RandomState(0), 3, 128, 192) * 255).astype(np.uint8)
    batches = list(
        iter_tiled_patch_embeddings(
            net, images, size=(128, 192), box=(0, 0, 128, 192), embedding_dim=None,
            batch_size=4, tile_size=64, tile_overlap=16,
        )
    )
    assert [shape[0] for shape in seen[1:]] and max(shape[0] for shape in seen) <= 4
    assert all(shape[2:] == (64, 64) for shape in seen)
    assert sum(len(patches) for _, patches in batches) == 3
    assert all(patches.shape[1:3] == torch.Size([32, 48]) for _, patches in batches)


def test_tile_size_must_be_a_multiple_of_the_stride():
    extractor = ModuleExtractor(tiny_cnn(), ["layer1", "layer2"])
    with pytest.raises(ValueError, match="multiple of the backbone's stride"):
        extract_patch_features(extractor, np.zeros((1, 64, 64, 3), np.uint8), tile_size=62)


@pytest.fixture(scope="module")
def small_defect():
    """1024 px stripes; two test images carry a 6x6 px defect (1.5 px, under a patch, at 256)."""
    rng = np.random.RandomState(0)
    train, test = _stripes(rng, 4, 1024, 1024), _stripes(rng, 4, 1024, 1024)
    masks = np.zeros(test.shape[:3], dtype=bool)
    for i, (top, left) in zip((2, 3), ((300, 700), (810, 140))):
        test[i, top : top + 6, left : left + 6] = [1.0, 0.1, 0.1]
        masks[i, top : top + 6, left : left + 6] = True
    return train, test, masks


def _fit_and_map(train, test, **params):
    det = PatchCoreDetector(
        feature_extractor=ModuleExtractor(tiny_cnn(), ["layer2"]), coreset_ratio=0.01,
        random_state=0, algorithm="exact", **params,
    ).fit(train)
    maps, normality = det.anomaly_maps(test, return_score_samples=True)
    return maps, -normality


def test_full_resolution_tiles_find_a_defect_smaller_than_a_patch_at_256(small_defect):
    train, test, masks = small_defect
    maps, scores = _fit_and_map(train, test, image_size=None, tile_size=256)
    assert maps.shape == (4, 1024, 1024)
    assert scores[2:].min() > 1.5 * scores[:2].max()
    for i in (2, 3):  # the map's peak sits on the defect, within half a patch
        top, left = np.unravel_index(maps[i].argmax(), maps[i].shape)
        assert masks[i, max(0, top - 4) : top + 5, max(0, left - 4) : left + 5].any()


def test_the_same_defect_is_lost_at_256(small_defect):
    # The contrast: squeezed to 256 px, the defects score like normal images.
    train, test, _ = small_defect
    _, scores = _fit_and_map(train, test, image_size=256)
    assert scores[2:].min() < scores[:2].max()


def test_tiled_maps_align_with_input_pixels_on_non_square_images():
    rng = np.random.RandomState(1)
    train, test = _stripes(rng, 6, 96, 160), _stripes(rng, 2, 96, 160)
    test[1, 60:68, 120:128] = [1.0, 0.1, 0.1]
    det = PatchCoreDetector(
        feature_extractor=ModuleExtractor(tiny_cnn(), ["layer1", "layer2"]), image_size=None,
        tile_size=64, tile_overlap=48, random_state=0, algorithm="exact",
    ).fit(train)
    maps = det.anomaly_maps(test)
    assert maps.shape == (2, 96, 160)
    top, left = np.unravel_index(maps[1].argmax(), maps[1].shape)
    assert 56 <= top < 72 and 116 <= left < 132
    # Stitching is exact here, so the maps are those of whole-image extraction.
    untiled = det.set_params(tile_size=None).anomaly_maps(test)
    np.testing.assert_allclose(maps, untiled, rtol=1e-5, atol=1e-6)
