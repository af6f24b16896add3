import copy

import numpy as np
import pytest
from joblib import Memory
from sklearn.model_selection import GridSearchCV, KFold

import skpatchcore
from skpatchcore import ModuleExtractor, PatchCoreDetector, TorchvisionExtractor
from skpatchcore.feature_cache import cached_patch_embeddings, extractor_token
from skpatchcore.metrics import image_auroc_scorer

from .conftest import tiny_cnn


@pytest.fixture
def counted(tiny_params):
    """Detector parameters whose network counts its forward passes."""
    calls = []
    module = tiny_cnn()
    # A hook on a leaf layer: the traced graph calls it, and copies made by
    # clone / ModuleExtractor.load share the hook function, hence the list.
    module.stem.register_forward_hook(lambda *_: calls.append(1))
    params = dict(tiny_params, feature_extractor=ModuleExtractor(module, ["layer1", "layer2"]))
    return params, calls


@pytest.fixture
def labelled(textures):
    normal, defective, _ = textures
    X = np.concatenate([normal, defective])
    y = np.r_[np.zeros(len(normal)), np.ones(len(defective))].astype(int)
    return X, y


def test_token_is_equal_for_equal_module_copies():
    a = ModuleExtractor(tiny_cnn(), ["layer1", "layer2"])
    b = ModuleExtractor(copy.deepcopy(a.module), ["layer1", "layer2"])
    assert extractor_token(a) == extractor_token(b)


def test_token_changes_with_weights_layers_and_backbone():
    base = ModuleExtractor(tiny_cnn(), ["layer1", "layer2"])
    other_weights = copy.deepcopy(base.module)
    other_weights.stem.weight.data += 1e-3
    tokens = {
        extractor_token(base),
        extractor_token(ModuleExtractor(other_weights, ["layer1", "layer2"])),
        extractor_token(ModuleExtractor(base.module, ["layer2"])),
        extractor_token(TorchvisionExtractor("resnet18", weights=None)),
        extractor_token("resnet18"),
    }
    assert len(tokens) == 5


def test_a_name_and_its_torchvision_extractor_share_a_token():
    assert extractor_token("resnet18") == extractor_token(TorchvisionExtractor("resnet18"))


def test_cached_batches_equal_computed_ones(tmp_path, tiny_extractor, textures):
    net = tiny_extractor.load()
    images = textures[0]
    kwargs = dict(size=(32, 32), box=(0, 0, 32, 32), embedding_dim=20, batch_size=5)
    plain = [p.numpy() for _, p in cached_patch_embeddings(None, tiny_extractor, net, images, **kwargs)]
    for _ in range(2):  # a miss, then a hit
        cached = [
            p.numpy()
            for _, p in cached_patch_embeddings(str(tmp_path), tiny_extractor, net, images, **kwargs)
        ]
        assert [c.shape for c in cached] == [p.shape for p in plain]
        np.testing.assert_array_equal(np.concatenate(cached), np.concatenate(plain))


def test_memory_gives_the_same_detector_as_no_memory(tmp_path, tiny_params, textures):
    normal, defective, _ = textures
    plain = PatchCoreDetector(**tiny_params).fit(normal)
    cached = PatchCoreDetector(**tiny_params, memory=Memory(tmp_path, verbose=0)).fit(normal)
    cached_again = PatchCoreDetector(**tiny_params, memory=str(tmp_path)).fit(normal)
    for det in (cached, cached_again):
        np.testing.assert_array_equal(det.memory_bank_, plain.memory_bank_)
        assert det.offset_ == plain.offset_
        np.testing.assert_array_equal(det.score_samples(defective), plain.score_samples(defective))
        np.testing.assert_array_equal(det.anomaly_maps(defective), plain.anomaly_maps(defective))


def test_refit_and_rescore_read_the_cache_without_forward_passes(tmp_path, counted, textures):
    params, calls = counted
    normal, defective, _ = textures
    det = PatchCoreDetector(**params, batch_size=64, memory=str(tmp_path)).fit(normal)
    det.score_samples(defective)
    assert len(calls) == 2
    det.set_params(coreset_ratio=0.5, sigma=2.0).fit(normal)
    det.score_samples(defective)
    det.anomaly_maps(defective)
    assert len(calls) == 2


def test_fits_differing_only_in_scoring_share_one_coreset_selection(tmp_path, tiny_params, textures, monkeypatch):
    from skpatchcore.coreset import ProjectedRows

    selections = []
    select = ProjectedRows.select
    monkeypatch.setattr(ProjectedRows, "select", lambda self, *a, **k: selections.append(1) or select(self, *a, **k))
    normal = textures[0]
    plain = PatchCoreDetector(**tiny_params, sigma=2.0, n_neighbors=3).fit(normal)
    PatchCoreDetector(**tiny_params, memory=str(tmp_path)).fit(normal)
    assert len(selections) == 2
    shared = PatchCoreDetector(**tiny_params, sigma=2.0, n_neighbors=3, memory=str(tmp_path)).fit(normal)
    assert len(selections) == 2  # read from the cache
    np.testing.assert_array_equal(shared.coreset_indices_, plain.coreset_indices_)
    assert (shared.offset_, shared.pixel_threshold_) == (plain.offset_, plain.pixel_threshold_)
    # What the selection depends on: the ratio, the seed, the projection and its batches.
    for change in ({"coreset_ratio": 0.2}, {"random_state": 1}, {"projection_dim": 16}, {"batch_size": 3}):
        PatchCoreDetector(**{**tiny_params, **change}, memory=str(tmp_path)).fit(normal)
    assert len(selections) == 6
    # Nor is a selection made by another release of the library reused.
    monkeypatch.setattr(skpatchcore, "__version__", "0.0.0")
    PatchCoreDetector(**tiny_params, memory=str(tmp_path)).fit(normal)
    assert len(selections) == 7


def test_grid_search_runs_the_network_once_per_fold(tmp_path, counted, labelled):
    params, calls = counted
    X, y = labelled
    grid = {"coreset_ratio": [0.1, 0.5], "n_neighbors": [1, 3], "sigma": [2.0, 4.0]}
    search = GridSearchCV(
        PatchCoreDetector(**params, batch_size=64, memory=str(tmp_path)),
        grid, scoring=image_auroc_scorer, cv=KFold(3, shuffle=True, random_state=0),
    ).fit(X, y)
    # One pass per training fold, one per test fold, one for the refit.
    assert len(calls) == 3 + 3 + 1
    plain = GridSearchCV(
        PatchCoreDetector(**params, batch_size=64), grid, scoring=image_auroc_scorer,
        cv=KFold(3, shuffle=True, random_state=0),
    ).fit(X, y)
    assert len(calls) == 7 + 8 * 3 * 2 + 1
    np.testing.assert_array_equal(
        search.cv_results_["mean_test_score"], plain.cv_results_["mean_test_score"]
    )


def test_with_memory_a_search_builds_its_network_once(tmp_path, textures, monkeypatch):
    from skpatchcore import feature_cache

    builds = []
    load = TorchvisionExtractor.load
    monkeypatch.setattr(TorchvisionExtractor, "load", lambda self: builds.append(1) or load(self))
    monkeypatch.setattr(feature_cache, "_LAST_NETWORK", {})
    extractor = TorchvisionExtractor("resnet18", layers=("layer1", "layer2"), weights=None)
    params = dict(feature_extractor=extractor, image_size=64, coreset_ratio=0.2, random_state=0)
    normal = textures[0]
    plain = [PatchCoreDetector(**params).fit(normal) for _ in range(2)]
    assert len(builds) == 2  # without a cache, every fit builds its network
    cached = [PatchCoreDetector(memory=Memory(tmp_path, verbose=0), **params).fit(normal) for _ in range(2)]
    assert len(builds) == 3  # one more build, then shared
    assert cached[0].feature_extractor_ is cached[1].feature_extractor_
    np.testing.assert_array_equal(cached[1].score_samples(normal), plain[0].score_samples(normal))
    PatchCoreDetector(memory=Memory(tmp_path, verbose=0), **{**params, "feature_extractor": TorchvisionExtractor(
        "resnet18", layers=("layer2", "layer3"), weights=None)}).fit(normal)
    assert len(builds) == 4  # another extractor: built anew
