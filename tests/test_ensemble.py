"""PatchCoreEnsemble: normalisation, fusion, nested parameters, clone and pickle."""

import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone

from skpatchcore import ModuleExtractor, PatchCoreDetector, PatchCoreEnsemble

from .conftest import tiny_cnn


def _member(scale=1.0, layers=("layer1", "layer2")):
    """A tiny detector whose patch features are ``scale`` times the plain network's.

    ``n_neighbors=1`` skips Eq. 7's softmax, so its scores scale with the features.
    """
    net = tiny_cnn()
    with torch.no_grad():  # ReLU is positively homogeneous: both layers scale by `scale`
        net.layer1.weight *= scale
        net.layer1.bias *= scale
        net.layer2.bias *= scale
    return PatchCoreDetector(
        feature_extractor=ModuleExtractor(net, list(layers)), image_size=32, n_neighbors=1,
        random_state=0, algorithm="exact",
    )


@pytest.fixture(scope="module")
def fitted(textures):
    normal, _, _ = textures
    members = [("plain", _member()), ("deep", _member(layers=("layer2",)))]
    return PatchCoreEnsemble(members).fit(normal[:10])


def test_zscore_uses_each_members_leave_one_out_scores(fitted):
    for member, location, scale in zip(
        fitted.detectors_, fitted.score_location_, fitted.score_scale_, strict=True
    ):
        train = -member.train_score_samples_
        assert location == pytest.approx(train.mean())
        assert scale == pytest.approx(train.std())


def test_scores_are_the_mean_of_normalised_member_scores(fitted, textures):
    normal, defective, _ = textures
    X = np.concatenate([normal[10:], defective])
    member = np.stack([-d.score_samples(X) for d in fitted.detectors_])
    expected = ((member - fitted.score_location_[:, None]) / fitted.score_scale_[:, None]).mean(0)
    np.testing.assert_allclose(fitted.score_samples(X), -expected, rtol=1e-6)


def test_maps_are_the_mean_of_maps_over_pixel_thresholds(fitted, textures):
    _, defective, _ = textures
    expected = np.mean([d.anomaly_maps(defective) / d.pixel_threshold_ for d in fitted.detectors_], 0)
    maps, normality = fitted.anomaly_maps(defective, return_score_samples=True)
    np.testing.assert_allclose(maps, expected, rtol=1e-5)
    np.testing.assert_allclose(normality, fitted.score_samples(defective), rtol=1e-6)


def test_normalisation_removes_a_members_distance_scale(textures):
    # A member whose distances are 10x larger must not outweigh the other one.
    normal, defective, _ = textures
    X = np.concatenate([normal[10:], defective])
    alone = PatchCoreEnsemble([_member()]).fit(normal[:10])
    doubled = PatchCoreEnsemble([_member(), _member(scale=10.0)]).fit(normal[:10])
    np.testing.assert_allclose(doubled.score_samples(X), alone.score_samples(X), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(doubled.anomaly_maps(X), alone.anomaly_maps(X), rtol=1e-4, atol=1e-5)


def test_max_normalisation_divides_by_the_largest_leave_one_out_score(textures):
    normal, _, _ = textures
    ens = PatchCoreEnsemble([_member(), _member(scale=10.0)], normalization="max").fit(normal[:10])
    np.testing.assert_array_equal(ens.score_location_, [0.0, 0.0])
    np.testing.assert_allclose(ens.score_scale_, [(-d.train_score_samples_).max() for d in ens.detectors_])
    assert ens.train_score_samples_.min() == pytest.approx(-1.0)  # every member's max is 1


def test_ensemble_flags_the_defective_images(fitted, textures):
    normal, defective, _ = textures
    assert (fitted.predict(defective) == -1).all()
    assert fitted.score_samples(defective).max() < fitted.score_samples(normal[10:]).min()
    # The training threshold: every held-out training image passes.
    assert (fitted.train_score_samples_ >= fitted.offset_).all()


def test_get_params_exposes_members_by_name():
    ens = PatchCoreEnsemble([("a", _member()), ("b", _member())])
    params = ens.get_params()
    assert params["a__image_size"] == 32 and params["b"] is ens.detectors[1][1]
    ens.set_params(b__image_size=64, normalization="max")
    assert ens.detectors[1][1].image_size == 64 and ens.normalization == "max"
    unnamed = PatchCoreEnsemble([_member(), _member()])
    assert unnamed.get_params()["d1__image_size"] == 32
    replacement = _member()
    unnamed.set_params(d0=replacement)
    assert unnamed.detectors[0] is replacement


def test_clone_copies_members_unfitted(fitted):
    copy = clone(fitted)
    assert not hasattr(copy, "detectors_")
    assert copy.detectors[0][1] is not fitted.detectors[0][1]
    assert copy.get_params()["plain__image_size"] == 32


def test_fitted_ensemble_pickles(fitted, textures):
    _, defective, _ = textures
    loaded = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(loaded.score_samples(defective), fitted.score_samples(defective))


def test_fit_leaves_the_given_members_unfitted(fitted):
    assert not hasattr(fitted.detectors[0][1], "memory_bank_")


@pytest.mark.parametrize(
    "detectors, error, match",
    [
        ([], ValueError, "at least one"),
        ([object()], TypeError, "PatchCoreDetector"),
        ([("a", _member()), ("a", _member())], ValueError, "unique"),
    ],
)
def test_invalid_members_are_rejected(textures, detectors, error, match):
    normal, _, _ = textures
    with pytest.raises(error, match=match):
        PatchCoreEnsemble(detectors).fit(normal[:10])


def test_grid_search_chooses_member_parameters(textures):
    from sklearn.model_selection import GridSearchCV

    from skpatchcore.metrics import image_auroc_scorer

    normal, defective, _ = textures
    X = np.concatenate([normal, defective])
    y = np.r_[np.zeros(len(normal)), np.ones(len(defective))].astype(int)
    # Fit on 10 normal images; validate on the other normal and all defective ones.
    split = [(np.arange(10), np.arange(10, len(X)))]
    search = GridSearchCV(
        PatchCoreEnsemble([("a", _member()), ("b", _member(layers=("layer2",)))]),
        {"normalization": ["zscore", "max"], "b__image_size": [32, 48]},
        scoring=image_auroc_scorer, cv=split,
    ).fit(X, y)
    assert len(search.cv_results_["params"]) == 4
    assert search.best_score_ == 1.0
    assert search.best_estimator_.detectors_[1].image_size == search.best_params_["b__image_size"]
