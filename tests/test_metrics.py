"""Tests of skpatchcore.metrics: values against scikit-learn and hand computations."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn.base import BaseEstimator
from sklearn.metrics import f1_score, precision_recall_curve, roc_auc_score
from sklearn.model_selection import GridSearchCV

from skpatchcore.metrics import (
    aupro,
    aupro_scorer,
    image_auroc,
    image_auroc_scorer,
    image_f1_max,
    image_f1_scorer,
    pixel_auroc,
    pixel_auroc_scorer,
    pro_curve,
)

# ----------------------------------------------------------------- image level


def test_image_auroc_matches_sklearn():
    rng = np.random.RandomState(0)
    y = rng.randint(0, 2, 50)
    scores = rng.rand(50) + 0.5 * y
    assert image_auroc(y, scores) == pytest.approx(roc_auc_score(y, scores))


def test_image_auroc_hand_computed():
    # Pairs (anomalous, normal) ranked correctly: 0.35>0.1, 0.8>0.1, 0.8>0.4 -> 3 of 4.
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75


def test_image_auroc_accepts_bool_labels():
    assert image_auroc(np.array([False, True]), [0.0, 1.0]) == 1.0


def test_image_f1_max_hand_computed():
    # Threshold 0.35 flags {0.4, 0.35, 0.8}: precision 2/3, recall 1 -> F1 0.8.
    f1, threshold = image_f1_max([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], return_threshold=True)
    assert f1 == pytest.approx(0.8)
    assert threshold == 0.35
    assert image_f1_max([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.8)


def test_image_f1_max_is_best_f1_score_over_thresholds():
    rng = np.random.RandomState(1)
    y = rng.randint(0, 2, 60)
    scores = rng.rand(60) + 0.4 * y
    best = max(f1_score(y, scores >= t) for t in np.unique(scores))
    f1, threshold = image_f1_max(y, scores, return_threshold=True)
    assert f1 == pytest.approx(best)
    assert f1_score(y, scores >= threshold) == pytest.approx(f1)
    precision, recall, _ = precision_recall_curve(y, scores)
    with np.errstate(invalid="ignore"):
        assert f1 == pytest.approx(np.nanmax(2 * precision * recall / (precision + recall)))


def test_image_f1_max_perfect_separation():
    f1, threshold = image_f1_max([0, 1, 0, 1], [0.2, 0.9, 0.1, 0.7], return_threshold=True)
    assert f1 == 1.0
    assert threshold == 0.7


@pytest.mark.parametrize("metric", [image_auroc, image_f1_max])
def test_image_metrics_reject_single_class(metric):
    with pytest.raises(ValueError, match="only one class.*got only normal"):
        metric([0, 0, 0], [0.1, 0.2, 0.3])


@pytest.mark.parametrize("metric", [image_auroc, image_f1_max])
def test_image_metrics_reject_length_mismatch(metric):
    with pytest.raises(ValueError, match=r"shape \(3,\) to match y_true; got shape \(2,\)"):
        metric([0, 1, 1], [0.1, 0.2])


def test_image_metrics_reject_non_binary_labels():
    with pytest.raises(ValueError, match=r"only 0 \(normal\) and 1.*got values \[0, 1, 2\]"):
        image_auroc([0, 1, 2], [0.1, 0.2, 0.3])


def test_image_metrics_point_out_the_predict_sign_convention():
    with pytest.raises(ValueError, match=r"got values \[-1, 1\]\. For predict\(\) output"):
        image_auroc([1, -1, 1], [0.1, 0.2, 0.3])


def test_image_metrics_reject_nan_scores():
    with pytest.raises(ValueError, match="finite"):
        image_auroc([0, 1], [0.1, np.nan])


# ----------------------------------------------------------------- pixel level


def _masks_and_maps(seed=0, n=6, size=16):
    rng = np.random.RandomState(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    masks[1, 2:6, 3:9] = True
    masks[1, 10:12, 10:15] = True
    masks[3, 8:14, 1:4] = True
    maps = rng.rand(n, size, size) + 0.6 * masks
    return masks, maps


def test_pixel_auroc_matches_sklearn_on_all_pixels():
    masks, maps = _masks_and_maps()
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected)


@pytest.mark.parametrize("encoding", [np.uint8, lambda m: m.astype(np.uint8) * 255, np.float32])
def test_masks_accept_bool_01_and_0_255(encoding):
    masks, maps = _masks_and_maps()
    assert pixel_auroc(encoding(masks), maps) == pytest.approx(pixel_auroc(masks, maps))
    assert aupro(encoding(masks), maps) == pytest.approx(aupro(masks, maps))


def test_pixel_metrics_reject_shape_mismatch():
    masks, maps = _masks_and_maps()
    with pytest.raises(
        ValueError, match=r"same shape as masks, \(6, 16, 16\); got shape \(6, 16, 15\)"
    ):
        pixel_auroc(masks, maps[:, :, :15])
    with pytest.raises(ValueError, match="same shape as masks"):
        aupro(masks, maps[:5])


def test_pixel_metrics_reject_2d_masks():
    with pytest.raises(ValueError, match=r"\(n_images, height, width\); got shape \(4, 4\)"):
        pixel_auroc(np.zeros((4, 4)), np.zeros((4, 4)))


def test_pixel_metrics_reject_non_binary_masks():
    masks = np.zeros((1, 4, 4), dtype=np.uint8)
    masks[0, 0, :2] = [128, 255]
    with pytest.raises(ValueError, match=r"binary.*got values \[0, 128, 255\]"):
        pixel_auroc(masks, np.zeros((1, 4, 4)))


def test_pixel_metrics_reject_masks_without_defects():
    masks = np.zeros((2, 4, 4), dtype=bool)
    with pytest.raises(ValueError, match="only one class.*got only normal"):
        pixel_auroc(masks, np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="at least one defect pixel"):
        aupro(masks, np.zeros((2, 4, 4)))


def test_pro_curve_without_normal_pixels_raises():
    with pytest.raises(ValueError, match="without normal pixels"):
        pro_curve(np.ones((1, 2, 2), dtype=bool), np.zeros((1, 2, 2)))


# ------------------------------------------------------------------------ PRO


def _two_region_case():
    """Image 0 has regions A (2 px) and B (1 px); image 1 is normal.

    Pixels by decreasing score: 0.9 A, 0.8 B, 0.6 N, 0.4 A, then only normal
    ones (9 normal pixels in all). A pixel of A adds 1/(2 regions * 2 px) =
    0.25 to PRO, the pixel of B adds 0.5, a normal pixel 1/9 to FPR.
    """
    masks = np.array([[[1, 1, 0, 0, 1, 0]], [[0, 0, 0, 0, 0, 0]]], dtype=bool)
    maps = np.array([[[0.9, 0.4, 0.6, 0.1, 0.8, 0.2]], [[0.3, 0, 0, 0, 0, 0]]])
    return masks, maps


def test_pro_curve_hand_computed_with_two_regions():
    fpr, pro, thresholds = pro_curve(*_two_region_case())
    np.testing.assert_allclose(fpr, [0, 0, 0, 1 / 9, 1 / 9, 2 / 9, 3 / 9, 4 / 9, 1])
    np.testing.assert_allclose(pro, [0, 0.25, 0.75, 0.75, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(thresholds, [np.inf, 0.9, 0.8, 0.6, 0.4, 0.3, 0.2, 0.1, 0])


def _naive_pro_curve(masks, maps):
    """PRO curve straight from the definition: a loop over thresholds and regions."""
    regions = []  # (image index, region mask)
    for i, image_mask in enumerate(masks):
        labels, n_regions = ndimage.label(image_mask, structure=np.ones((3, 3)))
        regions += [(i, labels == k) for k in range(1, n_regions + 1)]
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        predicted = maps >= t
        overlap = np.mean([predicted[i][region].mean() for i, region in regions])
        points.append((predicted[~masks].mean(), overlap))
    return np.array(points).T


def test_pro_curve_matches_the_definition_on_random_maps():
    masks, maps = _masks_and_maps(seed=3, n=4, size=12)
    maps = np.round(maps, 1)  # ties between normal and defect pixels
    fpr, pro, _ = pro_curve(masks, maps)
    expected_fpr, expected_pro = _naive_pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, expected_fpr)
    np.testing.assert_allclose(pro, expected_pro)


def test_aupro_hand_computed_with_two_regions():
    # PRO is 0.75 for FPR in [0, 1/9], then 1 up to the 0.3 limit.
    expected = (0.75 / 9 + (0.3 - 1 / 9)) / 0.3
    assert aupro(*_two_region_case()) == pytest.approx(expected)


def test_aupro_weighs_small_regions_like_large_ones():
    # Detecting only the 1-pixel region B counts as half the regions found.
    masks, _ = _two_region_case()
    maps = np.zeros(masks.shape)
    maps[0, 0, 4] = 1.0
    # PRO rises from 0.5 at FPR 0 linearly to 1 at FPR 1 (all ties at score 0).
    assert aupro(masks, maps) == pytest.approx((0.3 * 0.5 + 0.5 * 0.3**2 / 2) / 0.3)


def test_regions_are_8_connected_and_per_image():
    # Two diagonal pixels form one region; the same pixel in two images, two.
    masks = np.zeros((2, 3, 3), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True
    masks[1, 0, 0] = True
    maps = np.zeros(masks.shape)
    maps[0, 0, 0] = 1.0  # half of region 1 of 2 regions -> PRO 0.25 at FPR 0
    _, pro, _ = pro_curve(masks, maps)
    assert pro[1] == pytest.approx(0.25)


def test_aupro_interpolates_at_the_fpr_limit():
    # Tied scores: the curve is the diagonal from (0, 0) to (1, 1).
    masks = np.array([[[1, 0]]], dtype=bool)
    maps = np.full((1, 1, 2), 0.5)
    assert aupro(masks, maps) == pytest.approx(0.15)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.5)


def test_aupro_perfect_maps_score_one():
    masks, _ = _masks_and_maps()
    assert aupro(masks, masks.astype(np.float32)) == 1.0


def test_aupro_inverted_maps_score_zero():
    masks, _ = _masks_and_maps()
    assert aupro(masks, (~masks).astype(np.float32)) == 0.0


def test_aupro_random_maps_score_half_the_fpr_limit():
    # Many regions, so that the mean overlap at each FPR is close to the FPR.
    rng = np.random.RandomState(0)
    masks = np.zeros((40, 32, 32), dtype=bool)
    for i, r, c in zip(range(40), rng.randint(0, 28, 40), rng.randint(0, 28, 40), strict=True):
        masks[i, r : r + 4, c : c + 4] = True
    maps = rng.rand(*masks.shape)
    assert aupro(masks, maps) == pytest.approx(0.15, abs=0.02)
    assert aupro(masks, maps, fpr_limit=0.1) == pytest.approx(0.05, abs=0.02)


def test_aupro_binned_equals_exact_when_thresholds_hit_every_score():
    masks, _ = _masks_and_maps()
    levels = np.random.RandomState(0).randint(0, 5, masks.shape) / 4
    maps = np.minimum(levels + 0.5 * masks, 1.0)  # values 0, 0.25, ..., 1
    np.testing.assert_array_equal(np.unique(maps), np.linspace(0, 1, 5))
    assert aupro(masks, maps, num_thresholds=5) == pytest.approx(aupro(masks, maps))


def test_aupro_binned_approaches_exact_with_many_thresholds():
    masks, maps = _masks_and_maps()
    assert aupro(masks, maps, num_thresholds=5000) == pytest.approx(aupro(masks, maps), abs=2e-3)


def test_aupro_rejects_bad_fpr_limit():
    masks, maps = _masks_and_maps()
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, maps, fpr_limit=0.0)


# -------------------------------------------------------------------- scorers


class _BrightnessDetector(BaseEstimator):
    """Fake detector: bright pixels are anomalous; ``flip`` inverts everything."""

    def __init__(self, flip=False):
        self.flip = flip

    def fit(self, X, y=None):
        return self

    def _sign(self):
        return -1.0 if self.flip else 1.0

    def anomaly_maps(self, X):
        return self._sign() * np.asarray(X, dtype=np.float64).mean(axis=-1)

    def score_samples(self, X):
        # scikit-learn convention: higher = more normal.
        return -self._sign() * np.asarray(X, dtype=np.float64).mean(axis=-1).max(axis=(1, 2))


def _bright_defects(n=8, size=8):
    rng = np.random.RandomState(0)
    X = rng.randint(0, 50, (n, size, size, 3)).astype(np.uint8)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    masks[::4, 2:4, 2:5] = 255  # a quarter anomalous: F1 >= 0.4 at any ranking
    X[masks.astype(bool)] = 250
    return X, masks


@pytest.mark.parametrize(
    "scorer", [image_auroc_scorer, image_f1_scorer, pixel_auroc_scorer, aupro_scorer]
)
def test_scorers_handle_the_sign_convention(scorer):
    X, masks = _bright_defects()
    assert scorer(_BrightnessDetector(), X, masks) == pytest.approx(1.0)
    assert scorer(_BrightnessDetector(flip=True), X, masks) <= 0.4


@pytest.mark.parametrize("scorer", [image_auroc_scorer, image_f1_scorer])
def test_image_scorers_accept_labels_or_masks(scorer):
    X, masks = _bright_defects()
    labels = masks.any(axis=(1, 2)).astype(int)
    detector = _BrightnessDetector()
    assert scorer(detector, X, labels) == scorer(detector, X, masks)
    assert image_auroc_scorer(detector, X, labels) == image_auroc(
        labels, -detector.score_samples(X)
    )


@pytest.mark.parametrize("scorer", [pixel_auroc_scorer, aupro_scorer])
def test_pixel_scorers_need_masks(scorer):
    X, masks = _bright_defects()
    with pytest.raises(ValueError, match=r"masks as y.*got y of shape \(8,\)"):
        scorer(_BrightnessDetector(), X, masks.any(axis=(1, 2)))


def test_scorers_work_in_grid_search():
    X, masks = _bright_defects(n=12)
    half = np.arange(12) < 6
    search = GridSearchCV(
        _BrightnessDetector(),
        {"flip": [True, False]},
        scoring={
            "image_auroc": image_auroc_scorer,
            "image_f1": image_f1_scorer,
            "pixel_auroc": pixel_auroc_scorer,
            "aupro": aupro_scorer,
        },
        refit="aupro",
        cv=[(np.flatnonzero(half), np.flatnonzero(~half))],
    ).fit(X, masks)
    assert search.best_params_ == {"flip": False}
    for name in ("image_auroc", "image_f1", "pixel_auroc", "aupro"):
        assert search.cv_results_[f"mean_test_{name}"][1] == pytest.approx(1.0)
