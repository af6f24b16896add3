"""PatchCore as a scikit-learn outlier detector."""

from __future__ import annotations

import time
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, OutlierMixin, _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._device import check_device, module_on
from .coreset import GreedyCoresetSampler, coreset_size
from .features import FeatureExtractor, TorchvisionExtractor, iter_patch_embeddings
from .images import check_images, crop_box, resized_shape
from .maps import anomaly_maps
from .neighbors import NearestNeighborIndex, exact_kneighbors
from .scoring import image_scores, max_patches, reweighted_scores

__all__ = ["PatchCoreDetector"]


def _size_spec(value) -> bool:
    """int, or a pair of positive ints (height, width)."""
    if isinstance(value, Integral):
        return value > 0
    return (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, Integral) and v > 0 for v in value)
    )


class PatchCoreDetector(OutlierMixin, BaseEstimator):
    """PatchCore anomaly detection for images (Roth et al., CVPR 2022).

    Fitted on normal ("good") images only, PatchCore keeps a memory bank of
    locally aware patch features from a pretrained CNN, thinned by greedy
    coreset selection. A test image's patches are compared with the bank by
    nearest-neighbour distance: the largest distance, reweighted, is the image's
    anomaly score, and the distances smoothed to pixels are its anomaly map.

    **Sign conventions** (scikit-learn's): :meth:`score_samples` is the
    *opposite* of the anomaly score, so higher means more normal;
    :meth:`decision_function` subtracts ``offset_`` and is negative for
    anomalies; :meth:`predict` returns +1 for normal and -1 for anomalous
    images. :meth:`anomaly_maps` is not negated: higher pixels are more
    anomalous, so maps read like heatmaps.

    **Images.** ``X`` is ``(n, H, W, 3)`` RGB or ``(n, H, W)`` /
    ``(n, H, W, 1)`` grayscale (replicated to RGB). Integer arrays are 8-bit
    images in ``[0, 255]``; float arrays must lie in ``[0, 1]``; anything else
    raises. Flattened images ``(n, H*W*C)`` are read with ``image_shape``.
    Preprocessing: resize to ``image_size`` (antialiased bilinear), optional
    centre crop to ``crop_size``, then the extractor's normalisation
    (ImageNet statistics by default). Maps are always returned at each input
    image's own resolution and aligned with its pixels; non-square images
    keep their aspect ratio when ``image_size`` is an int.

    Parameters
    ----------
    feature_extractor : str or FeatureExtractor, default="wide_resnet50_2"
        A torchvision backbone name (ImageNet weights, layers ``layer2`` and
        ``layer3``, downloaded on first use) or an extractor object:
        :class:`TorchvisionExtractor` (name, layers, weights or a local file),
        :class:`ModuleExtractor` (any ``torch.nn.Module`` and layer names) or
        :class:`EfficientNetLite0Extractor` (works offline).
    image_size : int, (height, width) or None, default=256
        Size the network sees: an int sets the shorter side and keeps the
        aspect ratio, a pair sets both, ``None`` keeps each input's size.
    crop_size : int, (height, width) or None, default=None
        Centre crop after resizing (the paper crops 224 from 256). Map pixels
        outside the crop are 0. ``None`` sees the whole image.
    tile_size : int, (height, width) or None, default=None
        Run the network on tiles of this size (each side a multiple of the
        backbone's stride, 8 for the usual layers) cut from the resized
        image, and stitch their patch grids into one grid per image: full
        resolution (e.g. ``image_size=None``) with memory bounded by
        ``batch_size`` tiles. ``None`` feeds whole images.
    tile_overlap : int, default=32
        Minimum overlap of neighbouring tiles in pixels; cells near a tile's
        border are taken from its neighbour. Used with ``tile_size`` only.
    embedding_dim : int or None, default=1024
        Patch feature dimension after channel pooling (the authors' 1024);
        features with fewer channels are kept as they are.
    coreset_ratio : float in (0, 1], default=0.1
        Fraction of training patches kept in the memory bank.
    coreset_method : {"accelerated", "greedy"}, default="accelerated"
        See :class:`GreedyCoresetSampler`.
    projection_dim : int or None, default=128
        Random projection used to select the coreset (the paper's 128).
    n_neighbors : int, default=9
        Bank neighbours ``b`` used by the reweighting of the image score
        (Eq. 7); 1 disables the reweighting.
    algorithm : {"auto", "exact", "pynndescent"}, default="auto"
        Nearest-neighbour backend (see :class:`NearestNeighborIndex`). Image
        scores are exact whichever is used.
    contamination : "auto" or float in (0, 0.5], default="auto"
        Sets ``offset_`` from leave-one-image-out scores of the training
        images (each scored against bank entries from the *other* images,
        since a bank scores its own patches near 0): ``"auto"`` puts the
        threshold at the highest of them, so every held-out training image
        passes; a float flags that fraction of them.
    sigma : float, default=4.0
        Gaussian smoothing of the maps, in pixels of the network input.
    image_shape : (H, W) or (H, W, C), default=None
        Shape of one image when ``X`` is 2-D (flattened images); one entry
        may be -1 and is inferred from the row length.
    batch_size : int, default=16
        Images per forward pass; bounds the memory of activations.
    device : str or torch.device, default="cpu"
        Where the network and the exact neighbour search run ("cuda" when
        available). Read by each call, so a fitted detector scores wherever
        ``device`` points at scoring time: ``set_params(device="cpu")`` moves
        a GPU-fitted one to the CPU (see Notes on saving).
    n_jobs : int, default=None
        Threads building and querying the pynndescent index (see
        :class:`~skpatchcore.NearestNeighborIndex`). None means 1 unless in a
        ``joblib.parallel_config`` context, -1 means all processors; torch's
        own thread setting governs the network and the exact search.
    random_state : int, RandomState instance or None, default=None
        Seeds the coreset's projection and start and the approximate index;
        an int makes fits and scores bit-reproducible on CPU.
    verbose : int, default=0
        Print progress of the fitting stages.

    Attributes
    ----------
    feature_extractor_ : torch.nn.Module
        The loaded, frozen network (kept so a saved detector needs no download).
    memory_bank_ : ndarray of shape (n_bank, D), float32
        Coreset of the training patch features.
    coreset_indices_ : ndarray of shape (n_bank,)
        Their positions among all ``n_train * h * w`` training patches.
    nn_index_ : NearestNeighborIndex
        Index over ``memory_bank_``, built once here.
    bank_neighbors_ : ndarray of shape (n_bank, b)
        Each bank entry's ``b = min(n_neighbors, n_bank)`` nearest bank
        entries, itself (or a duplicate) first: the support of Eq. 7.
    offset_ : float
        Threshold on :meth:`score_samples`; ``decision_function = score_samples - offset_``.
    pixel_threshold_ : float
        Default threshold of :meth:`predict_masks`: the highest
        leave-one-image-out map value of the training images.
    train_score_samples_ : ndarray of shape (n_train,)
        Leave-one-image-out :meth:`score_samples` of the training images.
    n_features_in_ : int
        Values per training image (``H * W * C``).
    image_shape_ : tuple of int
        ``(H, W, C)`` of the training images.
    feature_shape_ : tuple of int
        Patch grid and dimension ``(h, w, D)`` of the training images.

    See Also
    --------
    GreedyCoresetSampler : The coreset subsampling on its own.
    NearestNeighborIndex : The nearest-neighbour search on its own.
    sklearn.neighbors.LocalOutlierFactor : The same sign conventions on vectors.

    Notes
    -----
    Steps follow the paper: mid-level features (Sec. 3.1) with 3x3
    neighbourhood aggregation and channel pooling (Eq. 1-2), greedy k-center
    coreset on a random projection (Sec. 3.2, Alg. 1), patch score = distance
    to the nearest bank entry and image score = largest patch score
    reweighted by Eq. 7 (Sec. 3.3), maps bilinearly upsampled and smoothed
    with a Gaussian of sigma 4.

    **Saving.** A fitted detector pickles (``pickle``, ``joblib.dump``)
    independently of its device: the state saved holds ``feature_extractor_``
    on the CPU, so a detector fitted with ``device="cuda"`` loads on a machine
    without a GPU. The live detector is left as it is (the network is copied
    to the CPU for the pickle through torch's own serialisation; a network
    already on the CPU is saved without a copy). The loaded detector keeps its ``device``
    parameter: on a machine without CUDA, ``set_params(device="cpu")`` before
    scoring. The ``feature_extractor`` parameter is saved as given, so a
    :class:`ModuleExtractor` should hold its module on the CPU.

    References
    ----------
    K. Roth, L. Pemula, J. Zepeda, B. Schoelkopf, T. Brox, P. Gehler,
    "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022.

    Examples
    --------
    >>> from skpatchcore import PatchCoreDetector, TorchvisionExtractor
    >>> from skpatchcore.datasets import make_anomaly_images
    >>> X, y, masks = make_anomaly_images(24, image_size=64, random_state=0)
    >>> det = PatchCoreDetector(
    ...     feature_extractor=TorchvisionExtractor("resnet18", weights=None),
    ...     image_size=64, random_state=0,
    ... ).fit(X[y == 0])
    >>> det.predict(X[:2]).shape
    (2,)
    >>> det.anomaly_maps(X[:2]).shape
    (2, 64, 64)
    """

    _parameter_constraints: dict = {
        "feature_extractor": [str, FeatureExtractor],
        "image_size": [Interval(Integral, 1, None, closed="left"), tuple, list, None],
        "crop_size": [Interval(Integral, 1, None, closed="left"), tuple, list, None],
        "tile_size": [Interval(Integral, 1, None, closed="left"), tuple, list, None],
        "tile_overlap": [Interval(Integral, 0, None, closed="left")],
        "embedding_dim": [Interval(Integral, 1, None, closed="left"), None],
        "coreset_ratio": [Interval(Real, 0, 1, closed="right")],
        "coreset_method": [StrOptions({"accelerated", "greedy"})],
        "projection_dim": [Interval(Integral, 1, None, closed="left"), None],
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "algorithm": [StrOptions({"auto", "exact", "pynndescent"})],
        "contamination": [StrOptions({"auto"}), Interval(Real, 0, 0.5, closed="right")],
        "sigma": [Interval(Real, 0, None, closed="left")],
        "image_shape": [None, tuple, list],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "device": [str, torch.device],
        "n_jobs": [Integral, None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        *,
        feature_extractor="wide_resnet50_2",
        image_size=256,
        crop_size=None,
        tile_size=None,
        tile_overlap=32,
        embedding_dim=1024,
        coreset_ratio=0.1,
        coreset_method="accelerated",
        projection_dim=128,
        n_neighbors=9,
        algorithm="auto",
        contamination="auto",
        sigma=4.0,
        image_shape=None,
        batch_size=16,
        device="cpu",
        n_jobs=None,
        random_state=None,
        verbose=0,
    ):
        self.feature_extractor = feature_extractor
        self.image_size = image_size
        self.crop_size = crop_size
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.embedding_dim = embedding_dim
        self.coreset_ratio = coreset_ratio
        self.coreset_method = coreset_method
        self.projection_dim = projection_dim
        self.n_neighbors = n_neighbors
        self.algorithm = algorithm
        self.contamination = contamination
        self.sigma = sigma
        self.image_shape = image_shape
        self.batch_size = batch_size
        self.device = device
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Build the memory bank from normal images.

        Parameters
        ----------
        X : array-like of shape (n_samples, H, W, C), (n_samples, H, W) or (n_samples, H*W*C)
            Training images, uint8 in [0, 255] or float in [0, 1]. The flat
            form needs ``image_shape``.
        y : array-like of shape (n_samples,) or (n_samples, H, W), default=None
            Optional labels, 0 normal and anything else anomalous, or defect
            masks (an image with any mask pixel set is anomalous). Only normal
            images enter the memory bank, so cross-validation over labelled
            data works.

        Returns
        -------
        self : PatchCoreDetector
            Fitted. A failed fit raises before changing any fitted attribute.
        """
        for name in ("image_size", "crop_size", "tile_size"):
            value = getattr(self, name)
            if value is not None and not _size_spec(value):
                raise ValueError(
                    f"{name} must be a positive int, a (height, width) pair of positive "
                    f"ints or None; got {value!r}."
                )
        device = check_device(self.device)
        images = check_images(X, image_shape=self.image_shape)
        if y is not None:
            images = images[self._normal_rows(y, len(images))]
        if len(images) < 2:
            raise ValueError(
                f"PatchCore needs at least 2 normal training images (thresholds are "
                f"set by scoring each one against the others); got n_samples = {len(images)}."
            )
        rng = check_random_state(self.random_state)
        coreset_seed, index_seed = rng.randint(np.iinfo(np.int32).max, size=2)

        start = time.perf_counter()
        extractor = self.feature_extractor
        if isinstance(extractor, str):
            extractor = TorchvisionExtractor(extractor)
        net = extractor.load().to(device)
        size = resized_shape(images.shape[1:3], self.image_size)
        box = crop_box(size, self.crop_size)
        patches = self._extract(net, images, size, box, device)
        n_images, h, w, dim = patches.shape
        self._log(f"extracted {n_images * h * w} patch features of {n_images} images "
                  f"({h}x{w} grid, {dim} dims)", start)

        n_bank = coreset_size(self.coreset_ratio, n_images * h * w)
        if n_bank < self.n_neighbors:
            raise ValueError(
                f"The coreset would keep {n_bank} of {n_images * h * w} patches, fewer than "
                f"n_neighbors={self.n_neighbors} needed by the score reweighting. Use more "
                "images, a larger image_size or coreset_ratio, or a smaller n_neighbors."
            )
        flat = patches.reshape(-1, dim)
        start = time.perf_counter()
        sampler = GreedyCoresetSampler(
            coreset_ratio=self.coreset_ratio,
            projection_dim=self.projection_dim,
            method=self.coreset_method,
            random_state=int(coreset_seed),
            device=device,
        ).fit(flat)
        coreset = sampler.indices_
        bank = np.ascontiguousarray(flat[coreset])
        self._log(f"coreset of {len(bank)} entries", start)

        start = time.perf_counter()
        index = NearestNeighborIndex(
            algorithm=self.algorithm, random_state=int(index_seed), n_jobs=self.n_jobs,
            device=device,
        ).fit(bank)
        # Eq. 7 weighs s* against the b bank neighbours of m*: looked up here
        # once per bank entry rather than searched again for every test image.
        bank_neighbors = index.kneighbors(bank, min(self.n_neighbors, len(bank)), exact=True)[1]
        self._log(f"{index.algorithm_} nearest-neighbour index", start)

        start = time.perf_counter()
        loo_scores, loo_maps = self._leave_one_out(patches, bank, coreset // (h * w), size, box)
        self._log("leave-one-image-out thresholds", start)

        self.feature_extractor_ = net
        self.memory_bank_ = index.bank_  # the index's array: one copy of the bank, not two
        self.coreset_indices_ = coreset
        self.nn_index_ = index
        self.bank_neighbors_ = bank_neighbors
        self.train_score_samples_ = -loo_scores
        if self.contamination == "auto":
            self.offset_ = float(self.train_score_samples_.min())
        else:
            self.offset_ = float(np.percentile(self.train_score_samples_, 100.0 * self.contamination))
        self.pixel_threshold_ = float(loo_maps.max())
        self.image_shape_ = images.shape[1:]
        self.n_features_in_ = int(np.prod(self.image_shape_))
        self.feature_shape_ = (h, w, dim)
        return self

    @staticmethod
    def _normal_rows(y, n_samples: int) -> np.ndarray:
        y = np.asarray(y)
        if len(y) != n_samples:
            raise ValueError(f"X has {n_samples} images but y has {len(y)} entries.")
        if y.ndim > 1:  # defect masks
            y = y.reshape(n_samples, -1).any(axis=1)
        normal = y == 0
        if not normal.any():
            raise ValueError("y marks every image as anomalous; PatchCore fits on normal images (y == 0).")
        return normal

    def _log(self, message: str, start: float) -> None:
        if self.verbose:
            print(f"[PatchCoreDetector] {message} in {time.perf_counter() - start:.1f} s")

    def _extract(self, net, images, size, box, device) -> np.ndarray:
        """All patch features ``(n, h, w, D)`` as one float32 array."""
        out = None
        try:
            for batch, patches in iter_patch_embeddings(
                net, images, size=size, box=box, embedding_dim=self.embedding_dim,
                batch_size=self.batch_size, device=device, tile_size=self.tile_size,
                tile_overlap=self.tile_overlap,
            ):
                if out is None:  # allocate once: no list of chunks plus a concatenated copy
                    out = np.empty((len(images), *patches.shape[1:]), dtype=np.float32)
                out[batch] = patches.cpu().numpy()
        except RuntimeError as exc:
            if "size" not in str(exc).lower():
                raise
            raise ValueError(
                f"Images of {box[2]}x{box[3]} pixels are too small for the backbone "
                f"({exc}). Use a larger image_size."
            ) from exc
        if min(out.shape[1:3]) < 3:
            # The 3x3 neighbourhood aggregation needs a grid to aggregate over.
            raise ValueError(
                f"Images of {box[2]}x{box[3]} pixels are too small for the backbone: they "
                f"give a {out.shape[1]}x{out.shape[2]} patch grid, at least 3x3 is needed. "
                "Use a larger image_size."
            )
        return out

    def _leave_one_out(self, patches, bank, bank_groups, size, box):
        """Image scores and map maxima of each training image against the others' bank entries."""
        n_images, h, w, dim = patches.shape
        if np.bincount(bank_groups, minlength=n_images).max() == len(bank):
            raise ValueError(
                "Every coreset entry comes from one training image, so it cannot be "
                "scored against the others; increase coreset_ratio."
            )
        image_ids = np.repeat(np.arange(n_images), h * w)
        flat = patches.reshape(-1, dim)
        dist, idx = exact_kneighbors(
            flat, bank, 1, query_groups=image_ids, bank_groups=bank_groups, device=self.device
        )
        dist, idx = dist[:, 0].reshape(n_images, -1), idx[:, 0].reshape(n_images, -1)
        _, patch, nearest = max_patches(dist, idx)
        # Each image may only use the entries of the others.
        k = min(self.n_neighbors, len(bank) - np.bincount(bank_groups).max())
        _, support = exact_kneighbors(
            bank[nearest], bank, k, query_groups=np.arange(n_images), bank_groups=bank_groups,
            device=self.device,
        )
        scores = reweighted_scores(patches.reshape(n_images, -1, dim)[np.arange(n_images), patch], bank, support)
        maps = anomaly_maps(
            torch.from_numpy(dist.reshape(n_images, h, w)), model_size=size, box=box,
            output_size=size, sigma=self.sigma,
        )
        return scores, maps.amax(dim=(1, 2)).numpy()

    # -------------------------------------------------------------- scoring
    def _score(self, X, *, with_maps: bool):
        """Image anomaly scores ``(n,)`` and, if asked, maps ``(n, H, W)``."""
        check_is_fitted(self)
        if np.ndim(X) == 2 and np.shape(X)[1] != self.n_features_in_:
            raise ValueError(
                f"X has {np.shape(X)[1]} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input."
            )
        images = check_images(X, image_shape=self.image_shape)
        if images.shape[-1] != self.image_shape_[-1]:
            raise ValueError(
                f"Images have {images.shape[-1]} channel(s) but the detector was fitted on "
                f"{self.image_shape_[-1]}-channel images."
            )
        device = check_device(self.device)
        # Network and exact search both follow the device set now, not the one of fit: a
        # detector fitted on a GPU scores on the CPU after set_params(device="cpu").
        net = self.feature_extractor_.to(device)
        self.nn_index_.set_params(device=device)
        size = resized_shape(images.shape[1:3], self.image_size)
        box = crop_box(size, self.crop_size)
        scores = np.empty(len(images), dtype=np.float32)
        maps = np.empty((len(images), *images.shape[1:3]), dtype=np.float32) if with_maps else None
        for batch, patches in iter_patch_embeddings(
            net, images, size=size, box=box, embedding_dim=self.embedding_dim,
            batch_size=self.batch_size, device=device, tile_size=self.tile_size,
            tile_overlap=self.tile_overlap,
        ):
            n, h, w, dim = patches.shape
            flat = patches.reshape(n, h * w, dim).cpu().numpy()
            scores[batch], dist = image_scores(self.nn_index_, flat, self.bank_neighbors_)
            if with_maps:
                maps[batch] = anomaly_maps(
                    torch.from_numpy(dist.reshape(n, h, w)), model_size=size, box=box,
                    output_size=images.shape[1:3], sigma=self.sigma,
                ).numpy()
        return scores, maps

    def score_samples(self, X) -> np.ndarray:
        """Opposite of the anomaly score: the higher, the more normal.

        The anomaly score is the reweighted largest patch distance (paper
        Eq. 6-7), always 0 or positive, so ``score_samples`` is 0 or negative.

        Parameters
        ----------
        X : array-like of shape (n_samples, H, W[, C]) or (n_samples, H*W*C)
            Images, as in :meth:`fit`; their size may differ from the training
            images' but not their channel count.

        Returns
        -------
        scores : ndarray of shape (n_samples,)
        """
        return -self._score(X, with_maps=False)[0]

    def decision_function(self, X) -> np.ndarray:
        """Shifted opposite of the anomaly score: negative for anomalies.

        ``decision_function(X) = score_samples(X) - offset_``.

        Parameters
        ----------
        X : array-like of shape (n_samples, H, W[, C]) or (n_samples, H*W*C)

        Returns
        -------
        decision : ndarray of shape (n_samples,)
            Below 0 for images scored more anomalous than the threshold.
        """
        return self.score_samples(X) - self.offset_

    def predict(self, X) -> np.ndarray:
        """Whether each image is normal (+1) or anomalous (-1).

        Parameters
        ----------
        X : array-like of shape (n_samples, H, W[, C]) or (n_samples, H*W*C)

        Returns
        -------
        labels : ndarray of shape (n_samples,)
            +1 for normal, -1 for anomalous.
        """
        return np.where(self.decision_function(X) < 0, -1, 1)

    def anomaly_maps(self, X, *, return_score_samples: bool = False):
        """Per-pixel anomaly maps at each input image's resolution.

        Parameters
        ----------
        X : array-like of shape (n_samples, H, W[, C]) or (n_samples, H*W*C)
        return_score_samples : bool, default=False
            Also return :meth:`score_samples` from the same forward pass.

        Returns
        -------
        maps : ndarray of shape (n_samples, H, W), float32
            Higher is more anomalous (not negated, unlike
            :meth:`score_samples`); values are patch distances.
        score_samples : ndarray of shape (n_samples,)
            Only with ``return_score_samples=True``.
        """
        scores, maps = self._score(X, with_maps=True)
        return (maps, -scores) if return_score_samples else maps

    def predict_masks(self, X, threshold: float | None = None) -> np.ndarray:
        """Boolean defect masks: pixels whose anomaly map exceeds ``threshold``.

        Parameters
        ----------
        X : array-like of shape (n_samples, H, W[, C]) or (n_samples, H*W*C)
        threshold : float, default=None
            In map units; ``None`` uses ``pixel_threshold_``, the highest value
            seen on held-out training images.

        Returns
        -------
        masks : ndarray of shape (n_samples, H, W), bool
        """
        check_is_fitted(self)
        threshold = self.pixel_threshold_ if threshold is None else threshold
        return self.anomaly_maps(X) > threshold

    def __getstate__(self):
        # A copy of the attribute dict: since Python 3.11 the inherited state is
        # self.__dict__ itself, which must keep the network where it runs.
        state = dict(super().__getstate__())
        if "feature_extractor_" in state:
            state["feature_extractor_"] = module_on(state["feature_extractor_"], "cpu")
        return state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True
        tags.input_tags.allow_nan = False
        tags.non_deterministic = self.random_state is None
        return tags
