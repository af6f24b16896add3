import copy
import pickle
import sys

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError

from skpatchcore import PatchCoreDetector


@pytest.fixture
def fitted(tiny_params, textures):
    normal, _, _ = textures
    return PatchCoreDetector(**tiny_params).fit(normal[6:])


def test_defective_images_score_below_normal_ones(fitted, textures):
    normal, defective, _ = textures
    assert fitted.score_samples(defective).max() < fitted.score_samples(normal[:6]).min()


def test_score_samples_is_the_negated_anomaly_score(fitted, textures):
    scores = fitted.score_samples(textures[1])
    assert np.all(scores <= 0)


def test_decision_function_is_shifted_by_offset(fitted, textures):
    X = textures[1]
    np.testing.assert_allclose(fitted.decision_function(X), fitted.score_samples(X) - fitted.offset_)


def test_predict_flags_defects_and_passes_held_out_normals(fitted, textures):
    normal, defective, _ = textures
    assert np.all(fitted.predict(defective) == -1)
    assert set(np.unique(fitted.predict(normal[:6]))) <= {-1, 1}
    assert np.mean(fitted.predict(normal[:6]) == 1) >= 0.5


def test_auto_threshold_comes_from_held_out_not_self_matches(fitted, textures):
    # Scored against their own patches, training images would score ~0.
    assert fitted.offset_ < -1e-3
    assert fitted.offset_ == pytest.approx(fitted.train_score_samples_.min())
    assert len(fitted.train_score_samples_) == 10


def test_float_contamination_takes_that_quantile(tiny_params, textures):
    det = PatchCoreDetector(contamination=0.2, **tiny_params).fit(textures[0][6:])
    assert np.mean(det.train_score_samples_ < det.offset_) == pytest.approx(0.2, abs=0.1)


def test_maps_have_the_input_resolution_and_peak_on_the_defect(fitted, textures):
    _, defective, masks = textures
    maps = fitted.anomaly_maps(defective)
    assert maps.shape == (6, 32, 32) and maps.dtype == np.float32
    for single, mask in zip(maps, masks):
        assert mask.flat[single.argmax()]  # the hottest pixel lies inside the defect


def test_maps_align_on_non_square_larger_inputs(fitted, textures):
    normal, _, _ = textures
    # A 64x128 image: two normal tiles side by side, upscaled; defect on the right.
    wide = np.concatenate([normal[0], normal[1]], axis=1)
    wide = np.kron(wide, np.ones((2, 2, 1), dtype=np.float32))[None]
    wide[0, 20:32, 90:102] = [1.0, 0.1, 0.1]
    maps = fitted.anomaly_maps(wide)
    assert maps.shape == (1, 64, 128)
    row, col = np.unravel_index(maps[0].argmax(), maps[0].shape)
    assert 12 <= row <= 40 and 82 <= col <= 110


def test_area_rule_resizes_long_images_to_the_pixels_of_a_square(tiny_params, textures):
    normal, defective, _ = textures
    # 32 x 80 strips: about 32^2 pixels under "area" is 20 x 51, what a pair asks for directly.
    def strips(images):
        return np.concatenate([images, images, images[:, :, :16]], axis=2)

    by_area = PatchCoreDetector(**{**tiny_params, "image_size_rule": "area"}).fit(strips(normal[6:]))
    by_pair = PatchCoreDetector(**{**tiny_params, "image_size": (20, 51)}).fit(strips(normal[6:]))
    by_side = PatchCoreDetector(**tiny_params).fit(strips(normal[6:]))
    np.testing.assert_array_equal(by_area.memory_bank_, by_pair.memory_bank_)
    assert len(by_side.memory_bank_) > len(by_area.memory_bank_)  # 32 x 80 input: more patches
    test = strips(defective)
    np.testing.assert_array_equal(by_area.score_samples(test), by_pair.score_samples(test))
    maps = by_area.anomaly_maps(test)
    assert maps.shape == (6, 32, 80)
    np.testing.assert_array_equal(maps, by_pair.anomaly_maps(test))


def test_unknown_size_rule_is_refused(tiny_params, textures):
    with pytest.raises(ValueError, match="image_size_rule"):
        PatchCoreDetector(**{**tiny_params, "image_size_rule": "longer_side"}).fit(textures[0])


def test_detector_pickled_before_the_size_rule_resizes_by_the_shorter_side(fitted, textures):
    old = pickle.loads(pickle.dumps(fitted))
    del old.__dict__["image_size_rule"]  # as unpickled from an earlier version
    assert old.get_params()["image_size_rule"] == "shorter_side"
    np.testing.assert_array_equal(old.score_samples(textures[1]), fitted.score_samples(textures[1]))


def test_return_score_samples_matches_score_samples(fitted, textures):
    maps, scores = fitted.anomaly_maps(textures[1], return_score_samples=True)
    np.testing.assert_array_equal(scores, fitted.score_samples(textures[1]))


def test_image_scores_do_not_depend_on_how_many_images_a_search_takes(tiny_params, textures, monkeypatch):
    normal, defective, _ = textures
    det = PatchCoreDetector(**tiny_params, batch_size=1).fit(normal[6:])
    joined = det.score_samples(defective)
    monkeypatch.setattr("skpatchcore.detector.SEARCH_BYTES", 1)
    np.testing.assert_array_equal(det.score_samples(defective), joined)


def test_predict_masks_cover_the_defects(fitted, textures):
    _, defective, masks = textures
    predicted = fitted.predict_masks(defective)
    assert predicted.dtype == bool and predicted.shape == masks.shape
    recall = (predicted & masks).sum() / masks.sum()
    assert recall > 0.5
    assert not fitted.predict_masks(defective, threshold=np.inf).any()


def test_labels_keep_only_normal_images_in_the_bank(tiny_params, textures):
    normal, defective, masks = textures
    X = np.concatenate([normal[6:], defective])
    y = np.r_[np.zeros(10), np.ones(6)]
    with_y = PatchCoreDetector(**tiny_params).fit(X, y)
    plain = PatchCoreDetector(**tiny_params).fit(normal[6:])
    np.testing.assert_array_equal(with_y.memory_bank_, plain.memory_bank_)
    masks_y = np.concatenate([np.zeros((10, 32, 32), bool), masks])
    with_masks = PatchCoreDetector(**tiny_params).fit(X, masks_y)
    np.testing.assert_array_equal(with_masks.memory_bank_, plain.memory_bank_)


def test_random_state_makes_fit_and_scores_bit_reproducible(tiny_params, textures):
    normal, defective, _ = textures
    a = PatchCoreDetector(**tiny_params).fit(normal[6:])
    b = PatchCoreDetector(**tiny_params).fit(normal[6:])
    np.testing.assert_array_equal(a.coreset_indices_, b.coreset_indices_)
    np.testing.assert_array_equal(a.score_samples(defective), b.score_samples(defective))
    assert a.offset_ == b.offset_


def test_coreset_ratio_sets_the_bank_size(tiny_params, textures):
    det = PatchCoreDetector(**{**tiny_params, "coreset_ratio": 0.25}).fit(textures[0][6:])
    assert det.memory_bank_.shape == (int(np.ceil(0.25 * 10 * 64)), 48)
    assert det.memory_bank_ is det.nn_index_.bank_  # one copy of the bank
    assert det.feature_shape_ == (8, 8, 48)
    assert det.image_shape_ == (32, 32, 3) and det.n_features_in_ == 32 * 32 * 3


def test_grayscale_fit_and_predict(tiny_params, textures):
    gray = (textures[0][..., 0] * 255).astype(np.uint8)
    det = PatchCoreDetector(**tiny_params).fit(gray[6:])
    assert det.image_shape_ == (32, 32, 1)
    assert det.score_samples(gray[:2]).shape == (2,)
    with pytest.raises(ValueError, match="1-channel"):
        det.score_samples(textures[0][:2])


def test_flattened_images_with_image_shape(tiny_params, textures):
    normal = textures[0]
    det = PatchCoreDetector(image_shape=(32, 32, 3), **tiny_params).fit(normal[6:].reshape(10, -1))
    np.testing.assert_array_equal(
        det.score_samples(normal[:3].reshape(3, -1)),
        PatchCoreDetector(**tiny_params).fit(normal[6:]).score_samples(normal[:3]),
    )
    with pytest.raises(ValueError, match="features"):
        det.score_samples(normal[:3].reshape(3, -1)[:, :100])


def test_predict_before_fit_raises(tiny_params, textures):
    with pytest.raises(NotFittedError):
        PatchCoreDetector(**tiny_params).predict(textures[0])


@pytest.mark.parametrize(
    "X, match",
    [
        (np.zeros((0, 32, 32, 3), np.uint8), "0 images"),
        (np.zeros((4, 32), np.uint8), "image_shape"),
        (np.zeros((4, 32, 32, 2), np.uint8), "channels"),
        (np.zeros((4, 32, 32, 4), np.uint8), "channels"),
        (np.full((4, 32, 32, 3), np.nan), "NaN"),
        (np.full((4, 32, 32, 3), 2.0), r"\[0, 1\]"),
        (np.zeros((1, 32, 32, 3), np.uint8), "at least 2"),
    ],
)
def test_bad_training_images_are_rejected(tiny_params, X, match):
    with pytest.raises(ValueError, match=match):
        PatchCoreDetector(**tiny_params).fit(X)


def test_images_too_small_for_the_backbone(tiny_params):
    with pytest.raises(ValueError, match="too small"):
        PatchCoreDetector(**{**tiny_params, "image_size": None}).fit(np.zeros((3, 8, 8, 3), np.uint8))


def test_too_few_patches_for_the_coreset(tiny_params, textures):
    with pytest.raises(ValueError, match="n_neighbors"):
        PatchCoreDetector(**{**tiny_params, "coreset_ratio": 0.001}).fit(textures[0][:2])


@pytest.mark.parametrize(
    "param, value",
    [("coreset_ratio", 0.0), ("coreset_ratio", 1.5), ("image_size", (0, 4)), ("algorithm", "kd"),
     ("contamination", 0.7), ("n_neighbors", 0)],
)
def test_invalid_parameters_are_rejected_at_fit(tiny_params, textures, param, value):
    det = PatchCoreDetector(**{**tiny_params, param: value})  # __init__ stores, never checks
    with pytest.raises(ValueError, match=param):
        det.fit(textures[0][6:])


def test_failed_refit_leaves_the_fitted_state_untouched(fitted, textures):
    bank, offset = fitted.memory_bank_, fitted.offset_
    with pytest.raises(ValueError):
        fitted.fit(np.full((4, 32, 32, 3), np.nan))
    assert fitted.memory_bank_ is bank and fitted.offset_ == offset
    assert fitted.score_samples(textures[1]).shape == (6,)


def test_pickle_saves_a_cpu_network_as_it_is(fitted):
    state = fitted.__getstate__()
    assert state["feature_extractor_"] is fitted.feature_extractor_  # no copy
    assert state is not fitted.__dict__
    loaded = pickle.loads(pickle.dumps(fitted))
    assert loaded.__dict__.keys() == fitted.__dict__.keys()
    saved, live = loaded.feature_extractor_.state_dict(), fitted.feature_extractor_.state_dict()
    assert saved.keys() == live.keys()
    assert all(torch.equal(saved[name], live[name]) for name in live)
    np.testing.assert_array_equal(loaded.memory_bank_, fitted.memory_bank_)
    assert loaded.offset_ == fitted.offset_


def test_copies_score_like_the_original(fitted, textures):
    want = fitted.score_samples(textures[1])
    for copied in (copy.deepcopy(fitted), pickle.loads(pickle.dumps(fitted))):
        np.testing.assert_array_equal(copied.score_samples(textures[1]), want)


def test_scoring_searches_on_the_detector_device_not_the_fit_one(fitted, textures):
    # As a CUDA fit loads on a CPU machine after set_params(device="cpu"): network
    # on the CPU, index built for "cuda".
    gpu_fitted = pickle.loads(pickle.dumps(fitted))
    gpu_fitted.nn_index_.set_params(device="cuda")
    np.testing.assert_array_equal(
        gpu_fitted.score_samples(textures[1]), fitted.score_samples(textures[1])
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present on this machine")
def test_cuda_without_a_gpu_is_a_clear_error(tiny_params, textures):
    with pytest.raises(ValueError, match="CUDA is not available"):
        PatchCoreDetector(device="cuda", **tiny_params).fit(textures[0][6:])


def test_thresholds_come_from_a_seeded_subset_of_training_images(tiny_params, textures):
    normal = textures[0][6:]
    det = PatchCoreDetector(**{**tiny_params, "max_threshold_images": 4}).fit(normal)
    held_out = det.threshold_image_indices_
    assert len(held_out) == 4 and np.all(np.diff(held_out) > 0) and held_out.max() < 10
    assert det.train_score_samples_.shape == (4,)
    again = PatchCoreDetector(**{**tiny_params, "max_threshold_images": 4}).fit(normal)
    np.testing.assert_array_equal(again.threshold_image_indices_, held_out)
    # The subset's leave-one-out scores are those of the same images in a full run.
    full = PatchCoreDetector(**{**tiny_params, "max_threshold_images": None}).fit(normal)
    np.testing.assert_array_equal(full.threshold_image_indices_, np.arange(10))
    np.testing.assert_allclose(det.train_score_samples_, full.train_score_samples_[held_out], rtol=1e-6)


def test_pixel_threshold_is_the_largest_leave_one_out_map_value(tiny_params, textures, monkeypatch):
    import skpatchcore.detector as detector_module
    from skpatchcore.images import crop_box, resized_shape
    from skpatchcore.maps import anomaly_maps
    from skpatchcore.neighbors import exact_kneighbors

    normal = textures[0][6:]
    searched = []
    search = detector_module.exact_kneighbors
    monkeypatch.setattr(
        detector_module, "exact_kneighbors", lambda X, *a, **kw: searched.append(len(X)) or search(X, *a, **kw)
    )
    det = PatchCoreDetector(**tiny_params).fit(normal)
    # Every held-out image's map, each searched in full against the others' entries.
    size = resized_shape(normal.shape[1:3], det.image_size)
    box = crop_box(size, det.crop_size)
    patches = np.concatenate([p.numpy() for _, p in det._patch_batches(det.feature_extractor_, normal, size, box, "cpu")])
    n, h, w, dim = patches.shape
    dist, _ = exact_kneighbors(
        patches.reshape(-1, dim), det.memory_bank_, 1, query_groups=np.repeat(np.arange(n), h * w),
        bank_groups=det.coreset_indices_ // (h * w),
    )
    maps = anomaly_maps(torch.from_numpy(dist.reshape(n, h, w)), model_size=size, box=box, output_size=size, sigma=det.sigma)
    assert det.pixel_threshold_ == pytest.approx(float(maps.max()), rel=1e-5)
    full_searches = sum(1 for rows in searched if rows == h * w)
    assert 1 <= full_searches < n  # only images whose bound map could hold the largest value


def test_features_on_disk_fit_as_in_memory_and_leave_no_file(
    tiny_params, textures, monkeypatch, tmp_path
):
    from skpatchcore import detector as detector_module

    normal, defective, _ = textures
    in_memory = PatchCoreDetector(**tiny_params).fit(normal[6:])
    monkeypatch.setattr(detector_module, "_IN_MEMORY_FEATURE_BYTES", 0)
    monkeypatch.setattr(detector_module.tempfile, "tempdir", str(tmp_path))
    opened = []
    real_open_memmap = np.lib.format.open_memmap
    monkeypatch.setattr(
        np.lib.format, "open_memmap", lambda *a, **k: opened.append(a[0]) or real_open_memmap(*a, **k)
    )
    mapped = PatchCoreDetector(**tiny_params).fit(normal[6:])
    assert len(opened) == 1 and opened[0].startswith(str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone
    # The same coreset (projected from the float32 stream), its rows kept in float16.
    np.testing.assert_array_equal(mapped.coreset_indices_, in_memory.coreset_indices_)
    np.testing.assert_array_equal(
        mapped.memory_bank_, in_memory.memory_bank_.astype(np.float16).astype(np.float32)
    )
    np.testing.assert_allclose(
        mapped.score_samples(defective), in_memory.score_samples(defective), rtol=2e-3
    )


def _resident_file_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_feature_file_keeps_its_pages_out_of_the_resident_set(tmp_path, monkeypatch):
    from skpatchcore import _memory
    from skpatchcore._memory import FeatureFile, image_features

    # Chunks of 1,464 rows, across image boundaries (4,096 rows each): 23 maps in all.
    monkeypatch.setattr(_memory, "_READ_CHUNK_BYTES", 3_000_000)

    values = np.random.RandomState(0).randn(8, 64, 64, 1024).astype(np.float32)  # 64 MiB in float16
    store = FeatureFile(str(tmp_path / "features.npy"), values.shape)
    before = _resident_file_mib()
    for start in (4, 0):  # any order
        store[slice(start, start + 4)] = values[start : start + 4]
    # A writable memory map would keep the 64 MiB written resident in the process.
    assert _resident_file_mib() - before < 16
    store.close()
    rows = np.random.RandomState(1).choice(8 * 64 * 64, 5000)  # unsorted, with repeats
    flat = values.astype(np.float16).astype(np.float32).reshape(-1, 1024)
    np.testing.assert_array_equal(store.rows(rows), flat[rows])
    np.testing.assert_array_equal(store.images(np.array([5, 2])), flat.reshape(values.shape)[[5, 2]])
    assert _resident_file_mib() - before < 16  # read a chunk at a time, each unmapped
    # How a Dask shard holding one travels: read into memory, in float16.
    np.testing.assert_array_equal(np.asarray(store), values.astype(np.float16))
    # Features in memory: all images, in order, are the array itself, not a copy.
    assert image_features(values, np.arange(8)) is values
    np.testing.assert_array_equal(image_features(values, np.array([5, 2])), values[[5, 2]])


def test_streamed_coreset_selects_like_the_sampler_on_all_features(tiny_params, textures):
    from skpatchcore import GreedyCoresetSampler
    from skpatchcore.features import extract_patch_features

    normal = textures[0][6:]
    det = PatchCoreDetector(**tiny_params).fit(normal)
    features = extract_patch_features(tiny_params["feature_extractor"], normal, image_size=32)
    coreset_seed = np.random.RandomState(0).randint(np.iinfo(np.int32).max, size=3)[0]
    sampler = GreedyCoresetSampler(random_state=int(coreset_seed)).fit(features.reshape(-1, 48))
    np.testing.assert_array_equal(det.coreset_indices_, sampler.indices_)


def test_fit_refuses_what_memory_cannot_hold_and_names_the_parameters(
    tiny_params, textures, monkeypatch
):
    from skpatchcore import _memory

    monkeypatch.setattr(_memory, "available_memory", lambda: 1000)
    with pytest.raises(MemoryError, match="coreset_ratio, projection_dim or image_size"):
        PatchCoreDetector(**tiny_params).fit(textures[0][6:])


def test_interrupted_fit_keeps_the_earlier_fit_and_no_temporary_file(
    fitted, textures, monkeypatch, tmp_path
):
    from skpatchcore import detector as detector_module
    from skpatchcore.coreset import ProjectedRows

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(detector_module, "_IN_MEMORY_FEATURE_BYTES", 0)
    monkeypatch.setattr(detector_module.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(ProjectedRows, "select", interrupt)
    bank, offset = fitted.memory_bank_, fitted.offset_
    with pytest.raises(KeyboardInterrupt):
        fitted.fit(textures[0][:8])
    assert fitted.memory_bank_ is bank and fitted.offset_ == offset
    assert list(tmp_path.iterdir()) == []
def test_images_of_different_sizes_score_each_at_its_own_size(fitted, textures):
    _, defective, _ = textures
    small = defective[0]
    large = np.repeat(np.repeat(defective[1], 2, axis=0), 3, axis=1)  # 64 x 96
    maps, scores = fitted.anomaly_maps([small, large, small], return_score_samples=True)
    assert [m.shape for m in maps] == [(32, 32), (64, 96), (32, 32)]
    np.testing.assert_array_equal(scores[[0, 2]], fitted.score_samples(small[None]).repeat(2))
    np.testing.assert_array_equal(maps[1], fitted.anomaly_maps(large[None])[0])
    assert [m.shape for m in fitted.predict_masks([small, large])] == [(32, 32), (64, 96)]


def test_fit_resizes_training_images_of_different_sizes(tiny_params, textures):
    normal = textures[0][6:]
    mixed = [normal[0], np.repeat(np.repeat(normal[1], 2, axis=0), 2, axis=1), *normal[2:]]
    det = PatchCoreDetector(**dict(tiny_params, image_size=(32, 32))).fit(mixed)
    assert det.image_shape_ == (32, 32, 3)
    assert np.isfinite(det.offset_)


def test_uint16_images_score_like_their_float_scaling(fitted, textures):
    X16 = np.round(textures[1] * 65535).astype(np.uint16)
    np.testing.assert_allclose(
        fitted.score_samples(X16), fitted.score_samples(X16 / 65535.0), rtol=1e-5
    )
