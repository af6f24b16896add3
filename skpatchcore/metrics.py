"""Image- and pixel-level anomaly detection metrics, and scorers for model selection.

Conventions, shared by every function here:

* ``y_true`` and masks mark anomalies with 1 (or ``True``, or 255 for masks
  read from 8-bit PNG files); 0 is normal.
* Scores and anomaly maps are *anomaly* scores: higher means more anomalous.

The ``*_scorer`` callables follow scikit-learn's ``scorer(estimator, X, y)``
protocol, so they can be passed as ``scoring=`` to
:class:`~sklearn.model_selection.GridSearchCV`. They take care of the sign
themselves: estimators follow scikit-learn's outlier-detection convention
(``score_samples`` is higher for *more normal* samples), so the scorers use
``-estimator.score_samples(X)`` as the anomaly score, and
``estimator.anomaly_maps(X)`` (higher = more anomalous) for pixel metrics.
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score
from sklearn.utils._param_validation import Interval, validate_params

__all__ = [
    "image_auroc",
    "pixel_auroc",
    "image_f1_max",
    "aupro",
    "pro_curve",
    "image_auroc_scorer",
    "image_f1_scorer",
    "pixel_auroc_scorer",
    "aupro_scorer",
]


# --------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------


def _check_labels(y_true, name: str = "y_true") -> np.ndarray:
    """Return ``y_true`` as a 1-D int array of 0/1, or raise a clear error."""
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of shape (n_samples,); got shape {y.shape}.")
    values = np.unique(y)
    if not np.isin(values, [0, 1]).all():
        # predict() of scikit-learn outlier detectors gives +1/-1: a likely mix-up.
        hint = (
            " For predict() output (+1 normal, -1 anomalous) use (y == -1)." if -1 in values else ""
        )
        raise ValueError(
            f"{name} must contain only 0 (normal) and 1 (anomalous); "
            f"got values {values[:10].tolist()}.{hint}"
        )
    return y.astype(np.int64)


def _check_scores(scores, n_samples: int, name: str = "anomaly_scores") -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (n_samples,):
        raise ValueError(
            f"{name} must have shape ({n_samples},) to match y_true; got shape {s.shape}."
        )
    if not np.isfinite(s).all():
        raise ValueError(f"{name} must be finite; got NaN or infinite values.")
    return s


def _require_both_classes(y: np.ndarray, metric: str, unit: str) -> None:
    n_anomalous = int(np.count_nonzero(y))
    if n_anomalous in (0, y.size):
        present = "anomalous" if n_anomalous else "normal"
        raise ValueError(
            f"{metric} is undefined when only one class is present: expected both "
            f"normal and anomalous {unit}, got only {present} ones ({y.size} in total)."
        )


def _check_masks(masks, name: str = "masks") -> np.ndarray:
    """Return binary ``masks`` of shape (n, H, W) as bool.

    Accepts bool, 0/1 or 0/255 values (the last is how MVTec AD stores them).
    """
    m = np.asarray(masks)
    if m.ndim != 3:
        raise ValueError(f"{name} must have shape (n_images, height, width); got shape {m.shape}.")
    if m.dtype == bool:
        return m
    top = m.max() if m.size else 0
    if top not in (0, 1, 255) or not np.all((m == 0) | (m == top)):
        raise ValueError(
            f"{name} must be binary (bool, 0/1 or 0/255); got values "
            f"{np.unique(m)[:10].tolist()} (dtype {m.dtype})."
        )
    return m != 0


def _check_maps(anomaly_maps, shape: tuple, name: str = "anomaly_maps") -> np.ndarray:
    a = np.asarray(anomaly_maps)
    if a.shape != shape:
        raise ValueError(f"{name} must have the same shape as masks, {shape}; got shape {a.shape}.")
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} must be finite; got NaN or infinite values.")
    return a


def _labels_from_y(y) -> np.ndarray:
    """Image labels from ``y`` given either as labels (n,) or masks (n, H, W)."""
    y = np.asarray(y)
    if y.ndim == 3:
        return _check_masks(y, name="y").reshape(len(y), -1).any(axis=1).astype(np.int64)
    return _check_labels(y, name="y")


# --------------------------------------------------------------------------
# Image-level metrics
# --------------------------------------------------------------------------


def image_auroc(y_true, anomaly_scores) -> float:
    """Area under the ROC curve of image-level anomaly scores.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        1 for anomalous images, 0 for normal ones. Both classes must occur.
    anomaly_scores : array-like of shape (n_samples,)
        Higher means more anomalous (e.g. ``-detector.score_samples(X)``).

    Returns
    -------
    auroc : float
        In ``[0, 1]``; 1 means every anomalous image scores above every
        normal one, 0.5 is chance.

    See Also
    --------
    sklearn.metrics.roc_auc_score : The computation used here.
    image_auroc_scorer : The same metric as a scorer for model selection.

    Examples
    --------
    >>> from skpatchcore.metrics import image_auroc
    >>> image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    """
    y = _check_labels(y_true)
    s = _check_scores(anomaly_scores, len(y))
    _require_both_classes(y, "Image AUROC", "images")
    return float(roc_auc_score(y, s))


def image_f1_max(
    y_true, anomaly_scores, *, return_threshold: bool = False
) -> float | tuple[float, float]:
    """Best F1 score over all decision thresholds on image anomaly scores.

    This is the "Image F1" of anomalib's benchmarks (its adaptive threshold):
    the F1 score of the anomalous class at the threshold that maximises it.
    Because the threshold is chosen on the evaluated data, it is an
    optimistic (oracle) figure, useful to compare models, not a deployment
    estimate.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        1 for anomalous images, 0 for normal ones. Both classes must occur.
    anomaly_scores : array-like of shape (n_samples,)
        Higher means more anomalous.
    return_threshold : bool, default=False
        Also return the threshold reaching the best F1.

    Returns
    -------
    f1 : float
        The maximal F1 score, in ``[0, 1]``.
    threshold : float
        Only when ``return_threshold=True``: images with
        ``anomaly_score >= threshold`` are predicted anomalous. Where several
        thresholds tie, the highest is returned.

    See Also
    --------
    sklearn.metrics.precision_recall_curve : The computation used here.
    image_f1_scorer : The same metric as a scorer for model selection.

    Examples
    --------
    >>> from skpatchcore.metrics import image_f1_max
    >>> image_f1_max([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], return_threshold=True)
    (0.8, 0.35)
    """
    y = _check_labels(y_true)
    s = _check_scores(anomaly_scores, len(y))
    _require_both_classes(y, "Image F1", "images")
    precision, recall, thresholds = precision_recall_curve(y, s)
    # The last (precision=1, recall=0) point has no threshold.
    precision, recall = precision[:-1], recall[:-1]
    denominator = precision + recall
    f1 = np.divide(
        2 * precision * recall,
        denominator,
        out=np.zeros_like(denominator),
        where=denominator > 0,
    )
    # Thresholds are increasing: take the last maximum, the highest threshold.
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))
    if return_threshold:
        return float(f1[best]), float(thresholds[best])
    return float(f1[best])


# --------------------------------------------------------------------------
# Pixel-level metrics
# --------------------------------------------------------------------------


def pixel_auroc(masks, anomaly_maps) -> float:
    """Area under the ROC curve over all pixels of all images.

    Every pixel counts as one sample, pooled over the images, as in the
    MVTec AD and PatchCore papers.

    Parameters
    ----------
    masks : array-like of shape (n_images, height, width)
        Ground-truth defect masks: bool, 0/1 or 0/255. Normal images have
        all-zero masks. At least one defect pixel must occur.
    anomaly_maps : array-like of shape (n_images, height, width)
        Per-pixel anomaly scores, higher = more anomalous, at the masks'
        resolution.

    Returns
    -------
    auroc : float
        In ``[0, 1]``.

    See Also
    --------
    aupro : The region-balanced pixel metric.
    pixel_auroc_scorer : The same metric as a scorer for model selection.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore.metrics import pixel_auroc
    >>> masks = np.zeros((2, 4, 4), dtype=bool)
    >>> masks[1, :2, :2] = True
    >>> pixel_auroc(masks, masks.astype(float))
    1.0
    """
    m = _check_masks(masks)
    a = _check_maps(anomaly_maps, m.shape)
    _require_both_classes(m, "Pixel AUROC", "pixels")
    # AUROC = P(defect score > normal score) + P(equal) / 2 (Mann-Whitney U),
    # the value roc_auc_score gives, from two sorts and binary search: several
    # times faster than building the ROC curve of millions of pixels.
    normal = np.sort(a[~m])
    defect = np.sort(a[m])
    below = np.searchsorted(normal, defect, side="left").sum(dtype=np.float64)
    not_above = np.searchsorted(normal, defect, side="right").sum(dtype=np.float64)
    return float((below + not_above) / (2.0 * normal.size * defect.size))


def _label_regions(m: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the 8-connected defect regions of each image separately."""
    # No connectivity along the image axis: regions never span two images.
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    return ndimage.label(m, structure=structure)


@validate_params(
    {
        "masks": ["array-like"],
        "anomaly_maps": ["array-like"],
        "num_thresholds": [Interval(Integral, 2, None, closed="left"), None],
    },
    prefer_skip_nested_validation=True,
)
def pro_curve(
    masks, anomaly_maps, *, num_thresholds: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-region overlap (PRO) against false positive rate, at every threshold.

    For a threshold ``t``, pixels with ``anomaly_map >= t`` are predicted
    defective. The PRO is the mean, over all ground-truth regions (8-connected
    components of the masks, found per image with ``scipy.ndimage.label``), of
    the fraction of each region that is predicted defective; the FPR is the
    fraction of normal pixels (of all images) that are. Bergmann et al.
    (2020), Sec. 4.1, define the metric; small defects weigh as much as large
    ones, unlike in pixel AUROC.

    Parameters
    ----------
    masks : array-like of shape (n_images, height, width)
        Ground-truth defect masks: bool, 0/1 or 0/255.
    anomaly_maps : array-like of shape (n_images, height, width)
        Per-pixel anomaly scores, higher = more anomalous.
    num_thresholds : int >= 2 or None, default=None
        ``None`` computes the exact curve, one point per distinct score. An
        int evaluates only that many thresholds, evenly spaced from the
        largest to the smallest score: a coarser curve (as in anomalib's
        binned AUPRO) that is about 3x faster to compute on millions of
        pixels.

    Returns
    -------
    fpr : ndarray of shape (n_points,), float64
        Non-decreasing, from 0 to 1.
    pro : ndarray of shape (n_points,), float64
        Non-decreasing, from 0 to 1.
    thresholds : ndarray of shape (n_points,), float64
        Decreasing; the first is ``+inf`` (nothing predicted defective).

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore.metrics import pro_curve
    >>> masks = np.array([[[0, 1, 1, 0]]], dtype=bool)
    >>> fpr, pro, thresholds = pro_curve(masks, np.array([[[0.0, 0.9, 0.5, 0.2]]]))
    >>> fpr.tolist(), pro.tolist()
    ([0.0, 0.0, 0.0, 0.5, 1.0], [0.0, 0.5, 1.0, 1.0, 1.0])
    """
    m = _check_masks(masks)
    # One precision for the scores and the thresholds searched among them.
    a = _check_maps(anomaly_maps, m.shape).ravel().astype(np.float64, copy=False)
    labels, n_regions = _label_regions(m)
    labels = labels.ravel()
    n_normal = int(labels.size - np.count_nonzero(labels))
    if n_regions == 0:
        raise ValueError(
            "PRO is undefined without defects: expected at least one defect pixel "
            f"in masks, got none in {m.shape[0]} images."
        )
    if n_normal == 0:
        raise ValueError(
            "PRO is undefined without normal pixels: expected masks with some "
            "zeros, got all pixels marked defective."
        )

    # A defect pixel adds 1 / (n_regions * its region's size) to PRO once it is
    # predicted defective. Sorting the normal and the defect scores separately
    # lets binary search count, for each threshold, the pixels at or above it.
    normal_scores = np.sort(a[labels == 0])
    defect_labels = labels[labels > 0]
    defect_scores = a[labels > 0]
    order = np.argsort(defect_scores)
    defect_scores = defect_scores[order]
    weights = 1.0 / (n_regions * np.bincount(labels)[defect_labels[order]])
    # pro_at[i]: PRO when defect pixels i, i+1, ... (the highest) are positive.
    pro_at = np.append(np.cumsum(weights[::-1])[::-1], 0.0)

    if num_thresholds is None:
        thresholds = np.unique(a)[::-1]
    else:
        thresholds = np.linspace(a.min(), a.max(), num_thresholds)[::-1]
    n_false_pos = n_normal - np.searchsorted(normal_scores, thresholds, side="left")
    pro = pro_at[np.searchsorted(defect_scores, thresholds, side="left")]
    # Start at "nothing positive". Dividing PRO by its total (1 up to round-off)
    # makes the curve end exactly at (1, 1), so a perfect map scores exactly 1.
    fpr = np.concatenate([[0.0], n_false_pos / n_normal])
    pro = np.concatenate([[0.0], pro / pro_at[0]])
    thresholds = np.concatenate([[np.inf], thresholds])
    return fpr, pro, thresholds


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under ``y(x)`` for ``x`` in ``[0, x_max]``.

    ``x`` is non-decreasing and may repeat (vertical steps); the curve is
    linearly interpolated at ``x_max``.
    """
    n_in = int(np.searchsorted(x, x_max, side="right"))
    xs, ys = x[:n_in], y[:n_in]
    if n_in < len(x) and xs[-1] < x_max:
        x0, x1, y0, y1 = x[n_in - 1], x[n_in], y[n_in - 1], y[n_in]
        xs = np.append(xs, x_max)
        ys = np.append(ys, y0 + (y1 - y0) * (x_max - x0) / (x1 - x0))
    return float(np.trapezoid(ys, xs))


@validate_params(
    {
        "masks": ["array-like"],
        "anomaly_maps": ["array-like"],
        "fpr_limit": [Interval(Real, 0, 1, closed="right")],
        "num_thresholds": [Interval(Integral, 2, None, closed="left"), None],
    },
    prefer_skip_nested_validation=True,
)
def aupro(
    masks, anomaly_maps, *, fpr_limit: float = 0.3, num_thresholds: int | None = None
) -> float:
    """Normalised area under the per-region-overlap curve up to an FPR limit.

    The PRO curve (see :func:`pro_curve`) is integrated with the trapezoidal
    rule from FPR 0 to ``fpr_limit`` (interpolating at the limit) and divided
    by ``fpr_limit``, so that a perfect segmentation scores 1. This is the
    AUPRO of Bergmann et al. (2020) and of the PatchCore paper (Roth et al.,
    2022, Sec. 4.1), with their FPR limit of 0.3, and follows MVTec's
    reference evaluation code.

    Parameters
    ----------
    masks : array-like of shape (n_images, height, width)
        Ground-truth defect masks: bool, 0/1 or 0/255. Normal images (all
        zeros) contribute false positives only.
    anomaly_maps : array-like of shape (n_images, height, width)
        Per-pixel anomaly scores, higher = more anomalous.
    fpr_limit : float in (0, 1], default=0.3
        Upper integration limit on the false positive rate.
    num_thresholds : int >= 2 or None, default=None
        ``None`` (the default) integrates the exact curve. The normal and the
        defect pixels' scores are sorted once, O(N log N), and binary search
        gives the FPR and PRO at every distinct score, so the result does not
        depend on a threshold grid. An int integrates the coarser curve at
        that many evenly spaced thresholds instead (see :func:`pro_curve`).

    Returns
    -------
    aupro : float
        In ``[0, 1]``. Random maps score about ``fpr_limit / 2``.

    See Also
    --------
    pro_curve : The curve being integrated.
    aupro_scorer : The same metric as a scorer for model selection.

    References
    ----------
    P. Bergmann, M. Fauser, D. Sattlegger, C. Steger, "Uninformed Students:
    Student-Teacher Anomaly Detection with Discriminative Latent Embeddings",
    CVPR 2020.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore.metrics import aupro
    >>> masks = np.zeros((2, 8, 8), dtype=bool)
    >>> masks[1, 2:4, 2:4] = True
    >>> aupro(masks, masks.astype(float))
    1.0
    """
    fpr, pro, _ = pro_curve(masks, anomaly_maps, num_thresholds=num_thresholds)
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


# --------------------------------------------------------------------------
# Scorers: scorer(estimator, X, y) -> float, greater is better
# --------------------------------------------------------------------------


def _anomaly_scores(estimator, X) -> np.ndarray:
    # score_samples is higher for normal samples (scikit-learn convention).
    return -np.asarray(estimator.score_samples(X), dtype=np.float64)


def image_auroc_scorer(estimator, X, y) -> float:
    """Image AUROC of a fitted detector, for ``GridSearchCV(scoring=...)``.

    Parameters
    ----------
    estimator : fitted detector
        Must provide ``score_samples(X)`` (higher = more normal).
    X : array-like of shape (n_samples, height, width, 3)
        Evaluation images.
    y : array-like of shape (n_samples,) or (n_samples, height, width)
        Image labels (1 = anomalous) or defect masks, from which an image is
        anomalous when any pixel is.

    Returns
    -------
    score : float
        :func:`image_auroc` of ``-estimator.score_samples(X)``.

    Examples
    --------
    >>> from sklearn.model_selection import GridSearchCV
    >>> from skpatchcore.metrics import image_auroc_scorer
    >>> search = GridSearchCV(detector, grid, scoring=image_auroc_scorer)  # doctest: +SKIP
    """
    return image_auroc(_labels_from_y(y), _anomaly_scores(estimator, X))


def image_f1_scorer(estimator, X, y) -> float:
    """Best-threshold image F1 of a fitted detector (see :func:`image_f1_max`).

    Parameters
    ----------
    estimator : fitted detector
        Must provide ``score_samples(X)`` (higher = more normal).
    X : array-like of shape (n_samples, height, width, 3)
        Evaluation images.
    y : array-like of shape (n_samples,) or (n_samples, height, width)
        Image labels (1 = anomalous) or defect masks.

    Returns
    -------
    score : float
        :func:`image_f1_max` of ``-estimator.score_samples(X)``.

    Examples
    --------
    >>> from skpatchcore.metrics import image_f1_scorer
    >>> image_f1_scorer(detector, X_test, y_test)  # doctest: +SKIP
    """
    return image_f1_max(_labels_from_y(y), _anomaly_scores(estimator, X))


def pixel_auroc_scorer(estimator, X, y) -> float:
    """Pixel AUROC of a fitted detector, for ``GridSearchCV(scoring=...)``.

    Parameters
    ----------
    estimator : fitted detector
        Must provide ``anomaly_maps(X)`` returning ``(n_samples, height,
        width)`` floats, higher = more anomalous.
    X : array-like of shape (n_samples, height, width, 3)
        Evaluation images.
    y : array-like of shape (n_samples, height, width)
        Defect masks (bool, 0/1 or 0/255) — pass the masks as ``y`` to
        ``GridSearchCV.fit`` so they are split with the images.

    Returns
    -------
    score : float
        :func:`pixel_auroc` of ``estimator.anomaly_maps(X)``.

    Examples
    --------
    >>> from skpatchcore.metrics import pixel_auroc_scorer
    >>> pixel_auroc_scorer(detector, X_test, masks_test)  # doctest: +SKIP
    """
    return pixel_auroc(_pixel_masks(y), estimator.anomaly_maps(X))


def aupro_scorer(estimator, X, y) -> float:
    """AUPRO (FPR limit 0.3) of a fitted detector, for ``GridSearchCV(scoring=...)``.

    Parameters
    ----------
    estimator : fitted detector
        Must provide ``anomaly_maps(X)`` returning ``(n_samples, height,
        width)`` floats, higher = more anomalous.
    X : array-like of shape (n_samples, height, width, 3)
        Evaluation images.
    y : array-like of shape (n_samples, height, width)
        Defect masks (bool, 0/1 or 0/255).

    Returns
    -------
    score : float
        :func:`aupro` of ``estimator.anomaly_maps(X)``.

    Examples
    --------
    >>> from skpatchcore.metrics import aupro_scorer
    >>> aupro_scorer(detector, X_test, masks_test)  # doctest: +SKIP
    """
    return aupro(_pixel_masks(y), estimator.anomaly_maps(X))


def _pixel_masks(y) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 3:
        raise ValueError(
            "Pixel-level scorers need the defect masks as y, shape "
            f"(n_samples, height, width); got y of shape {y.shape}."
        )
    return _check_masks(y, name="y")
