"""Several PatchCore detectors fused: one score per image and one map from all of them."""

from __future__ import annotations

from numbers import Real

import numpy as np
from sklearn.base import BaseEstimator, OutlierMixin, _fit_context, clone
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from .detector import PatchCoreDetector

__all__ = ["PatchCoreEnsemble"]


class PatchCoreEnsemble(OutlierMixin, BaseEstimator):
    """PatchCore detectors with different backbones or resolutions, fused.

    Each member is a :class:`PatchCoreDetector` fitted on the same images.
    Distances of different backbones are on different scales, so each
    member's anomaly scores are first normalised by statistics of its own
    leave-one-image-out training scores (``train_score_samples_``: each
    training image scored against the other images' bank entries), then
    averaged. Maps are divided by each member's ``pixel_threshold_`` (its
    highest leave-one-image-out map value) and averaged. The authors'
    best MVTec AD result comes from such an ensemble (paper Sec. 4.4).

    Sign conventions are the detector's: :meth:`score_samples` is higher for
    more normal images, :meth:`predict` gives +1 normal / -1 anomalous, and
    :meth:`anomaly_maps` is higher where more anomalous.

    Parameters
    ----------
    detectors : list of PatchCoreDetector or of (name, PatchCoreDetector)
        The members, cloned and fitted by :meth:`fit`. Any feature extractor
        works (e.g. a :class:`ModuleExtractor` around your own network).
        Named members expose their parameters as ``<name>__<param>`` (e.g.
        ``lite1__image_size`` for :class:`~sklearn.model_selection.GridSearchCV`);
        unnamed ones are named ``d0``, ``d1``, ...
    normalization : {"zscore", "max"}, default="zscore"
        Image scores: ``"zscore"`` subtracts the mean of the member's
        leave-one-out anomaly scores and divides by their standard
        deviation; ``"max"`` divides by their maximum.
    contamination : "auto" or float in (0, 0.5], default="auto"
        Sets ``offset_`` from the fused leave-one-out training scores, as in
        :class:`PatchCoreDetector`.

    Attributes
    ----------
    detectors_ : list of PatchCoreDetector
        The fitted members, in order.
    score_location_, score_scale_ : ndarray of shape (n_members,)
        Each member's normalisation: ``(anomaly score - location) / scale``.
    train_score_samples_ : ndarray of shape (n_train,)
        Fused leave-one-image-out :meth:`score_samples` of the training images.
    offset_ : float
        Threshold on :meth:`score_samples`.
    pixel_threshold_ : float
        Default threshold of :meth:`predict_masks`: 1.0, a fused pixel above
        which is, on average over the members, above their highest
        leave-one-out training map value.
    n_features_in_ : int
        Values per training image.

    See Also
    --------
    PatchCoreDetector : One member.
    skpatchcore.presets.make_detector : Named single-detector configurations.

    Examples
    --------
    >>> from skpatchcore import PatchCoreDetector, PatchCoreEnsemble, TorchvisionExtractor
    >>> from skpatchcore.datasets import make_anomaly_images
    >>> X, y, _ = make_anomaly_images(16, image_size=64, random_state=0)
    >>> members = [
    ...     (name, PatchCoreDetector(feature_extractor=TorchvisionExtractor(name, weights=None),
    ...                              image_size=64, random_state=0))
    ...     for name in ("resnet18", "resnet34")
    ... ]
    >>> ens = PatchCoreEnsemble(members).fit(X[y == 0])
    >>> ens.anomaly_maps(X[:2]).shape
    (2, 64, 64)
    """

    _parameter_constraints: dict = {
        "detectors": [list],
        "normalization": [StrOptions({"zscore", "max"})],
        "contamination": [StrOptions({"auto"}), Interval(Real, 0, 0.5, closed="right")],
    }

    def __init__(self, detectors, *, normalization="zscore", contamination="auto"):
        self.detectors = detectors
        self.normalization = normalization
        self.contamination = contamination

    # ------------------------------------------------------ nested parameters
    def _named_detectors(self) -> list[tuple[str, PatchCoreDetector]]:
        return [
            member if isinstance(member, tuple) else (f"d{i}", member)
            for i, member in enumerate(self.detectors)
        ]

    def get_params(self, deep=True):
        """Parameters of the ensemble and, with ``deep``, of each member as ``<name>__<param>``.

        Parameters
        ----------
        deep : bool, default=True

        Returns
        -------
        params : dict
        """
        params = super().get_params(deep=False)
        if deep:
            for name, member in self._named_detectors():
                params[name] = member
                params.update({f"{name}__{k}": v for k, v in member.get_params(deep=True).items()})
        return params

    def set_params(self, **params):
        """Set ensemble parameters, members by name, or member parameters ``<name>__<param>``.

        Parameters
        ----------
        **params : dict

        Returns
        -------
        self : PatchCoreEnsemble
        """
        if "detectors" in params:
            self.detectors = params.pop("detectors")
        named = dict(self._named_detectors())
        own = {}
        for key, value in params.items():
            name, _, sub = key.partition("__")
            if name not in named:
                own[key] = value
            elif sub:
                named[name].set_params(**{sub: value})
            else:  # a whole member replaced, keeping its place and name
                self.detectors = [
                    (name, value) if pair[0] == name and isinstance(member, tuple)
                    else value if pair[0] == name else member
                    for member, pair in zip(self.detectors, self._named_detectors())
                ]
                named[name] = value
        return super().set_params(**own) if own else self

    # -------------------------------------------------------------------- fit
    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X, y=None):
        """Fit every member on the same images and set the normalisations.

        Parameters
        ----------
        X : array-like of shape (n_samples, H, W[, C]) or (n_samples, H*W*C)
            Training images, as for :meth:`PatchCoreDetector.fit`.
        y : array-like of shape (n_samples,) or (n_samples, H, W), default=None
            Optional labels or masks; only normal images are used.

        Returns
        -------
        self : PatchCoreEnsemble
        """
        named = self._named_detectors()
        if not named:
            raise ValueError("detectors is empty: an ensemble needs at least one PatchCoreDetector.")
        for name, member in named:
            if not isinstance(member, PatchCoreDetector):
                raise TypeError(
                    f"Member {name!r} is a {type(member).__name__}; PatchCoreEnsemble fuses "
                    "PatchCoreDetector members (any feature_extractor)."
                )
        if len({name for name, _ in named}) != len(named):
            raise ValueError(f"Member names must be unique; got {[n for n, _ in named]}.")
        detectors = [clone(member).fit(X, y) for _, member in named]
        train = np.stack([-d.train_score_samples_ for d in detectors])  # anomaly scores
        if self.normalization == "zscore":
            location, scale = train.mean(axis=1), train.std(axis=1)
        else:
            location, scale = np.zeros(len(detectors)), train.max(axis=1)
        # A member whose training scores are all equal must not divide by 0.
        scale = np.where(scale > 0, scale, 1.0)

        self.detectors_ = detectors
        self.score_location_ = location
        self.score_scale_ = scale
        self.train_score_samples_ = -self._fuse_scores(train)
        if self.contamination == "auto":
            self.offset_ = float(self.train_score_samples_.min())
        else:
            self.offset_ = float(np.percentile(self.train_score_samples_, 100.0 * self.contamination))
        self.pixel_threshold_ = 1.0
        self.n_features_in_ = detectors[0].n_features_in_
        return self

    def _fuse_scores(self, member_scores: np.ndarray) -> np.ndarray:
        """Mean of normalised anomaly scores; ``member_scores`` is (n_members, n)."""
        normalised = (member_scores - self.score_location_[:, None]) / self.score_scale_[:, None]
        return normalised.mean(axis=0)

    # ---------------------------------------------------------------- scoring
    def score_samples(self, X) -> np.ndarray:
        """Opposite of the fused anomaly score: the higher, the more normal.

        Parameters
        ----------
        X : array-like of shape (n_samples, H, W[, C]) or (n_samples, H*W*C)

        Returns
        -------
        scores : ndarray of shape (n_samples,)
        """
        check_is_fitted(self)
        member_scores = np.stack([-d.score_samples(X) for d in self.detectors_])
        return -self._fuse_scores(member_scores)

    # Thresholding is the detector's, applied to the fused scores and maps.
    decision_function = PatchCoreDetector.decision_function
    predict = PatchCoreDetector.predict
    predict_masks = PatchCoreDetector.predict_masks

    def anomaly_maps(self, X, *, return_score_samples: bool = False):
        """Fused per-pixel anomaly maps at each input image's resolution.

        Each member's map is divided by its ``pixel_threshold_``; the maps
        are averaged. One forward pass per member gives maps and scores.

        Parameters
        ----------
        X : array-like of shape (n_samples, H, W[, C]) or (n_samples, H*W*C)
        return_score_samples : bool, default=False
            Also return :meth:`score_samples`.

        Returns
        -------
        maps : ndarray of shape (n_samples, H, W), float32
            Higher is more anomalous; 1 is the members' training maximum.
        score_samples : ndarray of shape (n_samples,)
            Only with ``return_score_samples=True``.
        """
        check_is_fitted(self)
        maps, member_scores = None, []
        for detector in self.detectors_:
            member_maps, normality = detector.anomaly_maps(X, return_score_samples=True)
            member_maps /= np.float32(detector.pixel_threshold_)
            if maps is None:
                maps = member_maps
            else:
                maps += member_maps
            member_scores.append(-normality)
        maps /= np.float32(len(self.detectors_))
        if not return_score_samples:
            return maps
        return maps, -self._fuse_scores(np.stack(member_scores))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True
        tags.input_tags.allow_nan = False
        return tags
