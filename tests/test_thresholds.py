import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import f1_score
from sklearn.pipeline import make_pipeline

from skpatchcore import ImageReader, PatchCoreDetector
from skpatchcore.metrics import image_f1_max
from skpatchcore.thresholds import TunedThresholdDetectorCV


@pytest.fixture
def labelled(textures):
    """16 normal then 6 defective images, labels and masks."""
    normal, defective, defect_masks = textures
    X = np.concatenate([normal, defective])
    labels = np.r_[np.zeros(len(normal)), np.ones(len(defective))].astype(int)
    masks = np.concatenate([np.zeros((len(normal), 32, 32), dtype=bool), defect_masks])
    return X, labels, masks


def test_f1_objective_puts_offset_at_the_best_out_of_fold_f1(tiny_params, labelled):
    X, labels, _ = labelled
    tuned = TunedThresholdDetectorCV(PatchCoreDetector(**tiny_params), cv=3).fit(X, labels)
    oof = tuned.oof_score_samples_
    assert tuned.best_score_ == image_f1_max(labels, -oof)
    flagged = (oof - tuned.offset_) < 0
    assert f1_score(labels, flagged) == pytest.approx(tuned.best_score_)


@pytest.mark.parametrize("rate, n_flagged", [(0.0, 0), (0.25, 4)])
def test_false_alarm_objective_flags_at_most_the_allowed_normals(tiny_params, labelled, rate, n_flagged):
    X, labels, _ = labelled
    tuned = TunedThresholdDetectorCV(
        PatchCoreDetector(**tiny_params), objective="false_alarm_rate",
        max_false_alarm_rate=rate, cv=3,
    ).fit(X, labels)
    normal_decision = tuned.oof_score_samples_[labels == 0] - tuned.offset_
    assert np.sum(normal_decision < 0) == n_flagged


def test_refit_estimator_is_fitted_on_all_normal_images(tiny_params, labelled):
    X, labels, _ = labelled
    tuned = TunedThresholdDetectorCV(PatchCoreDetector(**tiny_params), cv=2).fit(X, labels)
    direct = PatchCoreDetector(**tiny_params).fit(X[labels == 0])
    np.testing.assert_array_equal(tuned.estimator_.memory_bank_, direct.memory_bank_)
    np.testing.assert_array_equal(tuned.decision_function(X), direct.score_samples(X) - tuned.offset_)


def test_prefit_tunes_both_thresholds_on_a_validation_set(tiny_params, labelled):
    X, labels, masks = labelled
    detector = PatchCoreDetector(**tiny_params).fit(X[6:16])
    val = np.r_[0:6, 16:22]
    tuned = TunedThresholdDetectorCV(detector, cv="prefit").fit(X[val], masks[val])
    assert tuned.estimator_ is detector
    maps, scores = detector.anomaly_maps(X[val], return_score_samples=True)
    pixel_f1, _ = image_f1_max(masks[val].ravel(), maps.ravel(), return_threshold=True)
    predicted = tuned.predict_masks(X[val])
    assert f1_score(masks[val].ravel(), predicted.ravel()) == pytest.approx(pixel_f1)
    assert f1_score(labels[val], tuned.predict(X[val]) == -1) == pytest.approx(tuned.best_score_)


def test_without_masks_the_pixel_threshold_is_the_estimators(tiny_params, labelled):
    X, labels, _ = labelled
    detector = PatchCoreDetector(**tiny_params).fit(X[6:16])
    tuned = TunedThresholdDetectorCV(detector, cv="prefit").fit(X, labels)
    assert tuned.pixel_threshold_ == detector.pixel_threshold_


def test_pipeline_on_paths_with_masks(tiny_params, labelled, tmp_path):
    X, labels, masks = labelled
    paths = []
    for i, image in enumerate((X * 255).round().astype(np.uint8)):
        paths.append(str(tmp_path / f"{i:02d}.png"))
        Image.fromarray(image).save(paths[-1])
    pipe = make_pipeline(ImageReader(), PatchCoreDetector(**tiny_params))
    tuned = TunedThresholdDetectorCV(pipe, cv=2).fit(paths, masks)
    images = ImageReader().transform(paths)
    on_arrays = TunedThresholdDetectorCV(PatchCoreDetector(**tiny_params), cv=2).fit(images, masks)
    assert (tuned.offset_, tuned.pixel_threshold_) == (on_arrays.offset_, on_arrays.pixel_threshold_)
    np.testing.assert_array_equal(tuned.predict_masks(paths[-2:]), on_arrays.predict_masks(images[-2:]))


def test_masks_of_the_wrong_size_are_refused(tiny_params, labelled):
    X, _, masks = labelled
    detector = PatchCoreDetector(**tiny_params).fit(X[6:16])
    with pytest.raises(ValueError, match="resolution"):
        TunedThresholdDetectorCV(detector, cv="prefit").fit(X, masks[:, :16, :16])
