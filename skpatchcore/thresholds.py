"""Decision thresholds tuned on labelled images, in the spirit of ``TunedThresholdClassifierCV``.

:class:`~skpatchcore.PatchCoreDetector` sets ``offset_`` and
``pixel_threshold_`` from its normal training images alone. When some
labelled images exist (normal and defective, optionally with defect masks),
:class:`TunedThresholdDetectorCV` sets both from them instead: at the best
F1, or at a target false-alarm rate on the normal ones.
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, MetaEstimatorMixin, OutlierMixin, _fit_context, clone
from sklearn.model_selection import check_cv
from sklearn.pipeline import Pipeline
from sklearn.utils import _safe_indexing
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from .metrics import image_f1_max

__all__ = ["TunedThresholdDetectorCV"]


def transformed(estimator, X):
    """``X`` through a pipeline's first steps, and its last step; others as they are.

    ``Pipeline`` forwards ``score_samples`` but not ``anomaly_maps``: this
    reaches the detector at its end.
    """
    if isinstance(estimator, Pipeline):
        return estimator[:-1].transform(X), estimator[-1]
    return X, estimator


def _maps_and_scores(estimator, X, with_maps: bool):
    """``score_samples`` and, if asked, ``anomaly_maps`` of a detector or a pipeline ending in one."""
    if not with_maps:
        return estimator.score_samples(X), None
    X, detector = transformed(estimator, X)
    maps, scores = detector.anomaly_maps(X, return_score_samples=True)
    return scores, maps


def _labels_and_masks(y) -> tuple[np.ndarray, np.ndarray | None]:
    """Image labels (1 = anomalous) and, when ``y`` holds masks, the masks."""
    y = np.asarray(y)
    if y.ndim == 3:
        masks = y.astype(bool)
        return masks.any(axis=(1, 2)).astype(int), masks
    if y.ndim != 1:
        raise ValueError(
            f"y must be image labels (n_samples,) or defect masks (n_samples, H, W); got shape {y.shape}."
        )
    return (y != 0).astype(int), None


def _below(value: float) -> float:
    """The float32 just below ``value``: ``x > _below(t)`` is ``x >= t`` for float32 ``x``."""
    return float(np.nextafter(np.float32(value), np.float32(-np.inf)))


def _threshold(labels: np.ndarray, anomaly: np.ndarray, objective: str, rate: float):
    """Threshold ``t`` (anomalous where ``anomaly > t``) and the objective reached."""
    if objective == "f1":
        f1, t = image_f1_max(labels, anomaly, return_threshold=True)  # anomaly >= t
        return _below(t), f1
    normal = np.sort(anomaly[labels == 0])
    if len(normal) == 0:
        raise ValueError("objective='false_alarm_rate' needs normal images (label 0) in y.")
    allowed = int(np.floor(rate * len(normal)))  # normal images that may be flagged
    t = float(np.float32(normal[len(normal) - 1 - allowed]))
    recall = float(np.mean(anomaly[labels == 1] > t)) if (labels == 1).any() else np.nan
    return t, recall


class TunedThresholdDetectorCV(MetaEstimatorMixin, OutlierMixin, BaseEstimator):
    """A detector whose image and pixel thresholds are tuned on labelled images.

    The anomaly scores of ``X`` are computed out of fold, as
    ``cross_val_predict`` does: each image is scored by a copy of
    ``estimator`` fitted on the other folds (whose normal images alone enter
    its memory bank). The image threshold ``offset_`` and, when ``y`` holds
    defect masks, the pixel threshold ``pixel_threshold_`` are then chosen on
    those pooled scores, and ``estimator`` is refitted on all of ``X``. With
    ``cv="prefit"``, a fitted ``estimator`` scores ``X`` (a labelled
    validation set) directly.

    Parameters
    ----------
    estimator : PatchCoreDetector or Pipeline ending in one
        Provides ``fit(X, y)``, ``score_samples`` and, for the pixel
        threshold, ``anomaly_maps(X, return_score_samples=True)``.
    objective : {"f1", "false_alarm_rate"}, default="f1"
        ``"f1"``: the thresholds maximising the F1 score of the anomalous
        class (images; pixels). ``"false_alarm_rate"``: the lowest
        thresholds that flag at most ``max_false_alarm_rate`` of the normal
        images (normal pixels, i.e. outside the masks, for the pixel
        threshold).
    max_false_alarm_rate : float in [0, 1), default=0.01
        Target for ``objective="false_alarm_rate"``.
    cv : int, cross-validation generator, iterable or "prefit", default=5
        As in ``TunedThresholdClassifierCV``: an int gives a
        ``StratifiedKFold`` on the image labels.
    refit : bool, default=True
        Refit ``estimator`` on all of ``X`` after tuning; with False the
        model of the first fold is kept. Ignored with ``cv="prefit"``.

    Attributes
    ----------
    estimator_ : estimator
        The fitted detector used for scoring.
    offset_ : float
        ``decision_function = score_samples - offset_``; images whose
        out-of-fold anomaly score ``-score_samples`` exceeds ``-offset_`` are
        flagged.
    pixel_threshold_ : float
        Threshold of :meth:`predict_masks`, in map units; the estimator's own
        when ``y`` holds no masks.
    best_score_ : float
        Out-of-fold F1 at ``offset_`` for ``objective="f1"``; for
        ``"false_alarm_rate"``, the fraction of anomalous images detected.
    oof_score_samples_ : ndarray of shape (n_samples,)
        The out-of-fold ``score_samples`` the threshold was chosen on.

    See Also
    --------
    sklearn.model_selection.TunedThresholdClassifierCV : The same idea for classifiers.
    PatchCoreDetector : Thresholds from normal training images only.

    Examples
    --------
    >>> from skpatchcore import PatchCoreDetector, TorchvisionExtractor
    >>> from skpatchcore.thresholds import TunedThresholdDetectorCV
    >>> from skpatchcore.datasets import make_anomaly_images
    >>> X, y, masks = make_anomaly_images(30, image_size=64, anomaly_ratio=0.3, random_state=0)
    >>> detector = PatchCoreDetector(
    ...     feature_extractor=TorchvisionExtractor("resnet18", weights=None),
    ...     image_size=64, random_state=0)
    >>> tuned = TunedThresholdDetectorCV(detector, cv=3).fit(X, masks)
    >>> tuned.predict(X[:3]).shape
    (3,)
    """

    _parameter_constraints: dict = {
        "estimator": [HasMethods(["fit", "score_samples"])],
        "objective": [StrOptions({"f1", "false_alarm_rate"})],
        "max_false_alarm_rate": [Interval(Real, 0, 1, closed="left")],
        "cv": ["cv_object", StrOptions({"prefit"})],
        "refit": ["boolean"],
    }

    def __init__(self, estimator, *, objective="f1", max_false_alarm_rate=0.01, cv=5, refit=True):
        self.estimator = estimator
        self.objective = objective
        self.max_false_alarm_rate = max_false_alarm_rate
        self.cv = cv
        self.refit = refit

    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X, y):
        """Fit the detector and tune its thresholds on labelled images.

        Parameters
        ----------
        X : array-like of images or sequence of paths
            Whatever ``estimator.fit`` takes; normal and anomalous images.
        y : array-like of shape (n_samples,) or (n_samples, H, W)
            Image labels (0 normal, anything else anomalous) or defect masks
            at the images' resolution; masks also tune the pixel threshold.

        Returns
        -------
        self : TunedThresholdDetectorCV
        """
        labels, masks = _labels_and_masks(y)
        n = len(labels)
        scores = np.empty(n, dtype=np.float32)
        maps = None
        if self.cv == "prefit":
            check_is_fitted(self.estimator)
            estimator = self.estimator
            scores[:], maps = _maps_and_scores(estimator, X, masks is not None)
        else:
            splits = list(check_cv(self.cv, labels, classifier=True).split(np.zeros(n), labels))
            for i, (train, test) in enumerate(splits):
                fold = clone(self.estimator).fit(_safe_indexing(X, train), _safe_indexing(y, train))
                scores[test], fold_maps = _maps_and_scores(fold, _safe_indexing(X, test), masks is not None)
                if fold_maps is not None:
                    if maps is None:
                        maps = np.empty((n, *fold_maps.shape[1:]), dtype=np.float32)
                    maps[test] = fold_maps
                if i == 0 and not self.refit:
                    estimator = fold
            if self.refit:
                estimator = clone(self.estimator).fit(X, y)

        threshold, self.best_score_ = _threshold(
            labels, -scores.astype(np.float64), self.objective, self.max_false_alarm_rate
        )
        self.offset_ = -threshold
        if masks is None:
            detector = estimator[-1] if isinstance(estimator, Pipeline) else estimator
            self.pixel_threshold_ = float(detector.pixel_threshold_)
        else:
            if maps.shape != masks.shape:
                raise ValueError(
                    f"Masks of shape {masks.shape[1:]} do not match the anomaly maps "
                    f"{maps.shape[1:]}: pass masks at the images' resolution."
                )
            self.pixel_threshold_ = _threshold(
                masks.ravel().astype(int), maps.ravel(), self.objective, self.max_false_alarm_rate
            )[0]
        self.estimator_ = estimator
        self.oof_score_samples_ = scores
        return self

    def score_samples(self, X) -> np.ndarray:
        """The estimator's ``score_samples``: higher is more normal.

        Parameters
        ----------
        X : array-like of images or sequence of paths

        Returns
        -------
        scores : ndarray of shape (n_samples,)
        """
        check_is_fitted(self)
        return self.estimator_.score_samples(X)

    def decision_function(self, X) -> np.ndarray:
        """``score_samples(X) - offset_``: negative for anomalies.

        Parameters
        ----------
        X : array-like of images or sequence of paths

        Returns
        -------
        decision : ndarray of shape (n_samples,)
        """
        return self.score_samples(X) - self.offset_

    def predict(self, X) -> np.ndarray:
        """+1 for normal, -1 for anomalous images, at the tuned threshold.

        Parameters
        ----------
        X : array-like of images or sequence of paths

        Returns
        -------
        labels : ndarray of shape (n_samples,)
        """
        return np.where(self.decision_function(X) < 0, -1, 1)

    def anomaly_maps(self, X, *, return_score_samples: bool = False):
        """The estimator's anomaly maps (higher is more anomalous).

        Parameters
        ----------
        X : array-like of images or sequence of paths
        return_score_samples : bool, default=False
            Also return :meth:`score_samples` from the same pass.

        Returns
        -------
        maps : ndarray of shape (n_samples, H, W)
        score_samples : ndarray of shape (n_samples,)
            Only with ``return_score_samples=True``.
        """
        check_is_fitted(self)
        scores, maps = _maps_and_scores(self.estimator_, X, True)
        return (maps, scores) if return_score_samples else maps

    def predict_masks(self, X, threshold: float | None = None) -> np.ndarray:
        """Defect masks: pixels whose anomaly map exceeds ``threshold``.

        Parameters
        ----------
        X : array-like of images or sequence of paths
        threshold : float, default=None
            In map units; None uses the tuned ``pixel_threshold_``.

        Returns
        -------
        masks : ndarray of shape (n_samples, H, W), bool
        """
        check_is_fitted(self)
        threshold = self.pixel_threshold_ if threshold is None else threshold
        return self.anomaly_maps(X) > threshold

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        inner = self.estimator.__sklearn_tags__()
        tags.input_tags = inner.input_tags
        tags.non_deterministic = inner.non_deterministic
        return tags
