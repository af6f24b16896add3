"""PatchCore as a scikit-learn outlier detector."""

from __future__ import annotations

import functools
import os
import tempfile
import time
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, OutlierMixin, _fit_context
from sklearn.utils import check_random_state, gen_batches
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._device import check_device, module_on
from ._memory import FeatureFile, check_fits_in_memory, empty, image_features, patch_rows
from .coreset import ProjectedRows, coreset_size
from .feature_cache import cached_coreset, cached_patch_embeddings, feature_key, load_network
from .features import FeatureExtractor, TorchvisionExtractor
from .images import check_images, common_size_images, crop_box, resized_shape, size_groups
from .maps import anomaly_maps
from .neighbors import NearestNeighborIndex, exact_kneighbors
from .progress import log
from .scoring import SEARCH_BYTES, image_scores, reweighted_scores, search_batches

__all__ = ["PatchCoreDetector"]

# Patch features up to this size (in float32) stay in memory during fit, exact;
# larger ones are kept in float16, in a file in a temporary folder (removed
# when fit ends).
_IN_MEMORY_FEATURE_BYTES = 1 << 30
# Bank rows projected at a time when partial_fit extends a bank.
_LEADING_BATCH_ROWS = 4096
# Training images whose bound maps are drawn at a time while seeking the pixel threshold.
_THRESHOLD_MAP_BATCH = 16


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
    images in ``[0, 255]``, except ``uint16``, read over the full 16-bit range
    (``value / 65535``); float arrays must lie in ``[0, 1]``; anything else
    raises. A single image is passed as ``X[np.newaxis]``: a 3-D array
    ``(H, W, 3)`` is refused as ambiguous. Flattened images ``(n, H*W*C)``
    are read with ``image_shape``. A *list* of images of different sizes is
    accepted: each is resized as ``image_size`` says (to :meth:`fit`, they
    must then all give one network input size, e.g. ``image_size=(h, w)``),
    and :meth:`anomaly_maps` returns a list of maps, one per image at its own
    size.
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
        Size the network sees: an int keeps the aspect ratio and is read by
        ``image_size_rule``, a pair sets both sides, ``None`` keeps each
        input's size.
    image_size_rule : {"shorter_side", "area"}, default="shorter_side"
        How an int ``image_size`` resizes: ``"shorter_side"`` sets the
        shorter side (as ``torchvision.transforms.Resize``); ``"area"`` gives
        every image about ``image_size ** 2`` pixels, so an elongated part
        (e.g. 256 x 640 px) costs what a square one does instead of
        ``640 / 256`` times as much. Pairs and ``None`` ignore it.
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
        scores are exact whichever is used. ``"auto"`` builds a pynndescent
        graph (about a minute of numba compilation per process) only where it
        pays for itself over as many queries as the training images have
        patches (:func:`~skpatchcore.neighbors.pynndescent_pays_off`): large
        banks on the CPU. Say ``"pynndescent"`` for a detector that will score
        far more images than it was fitted on.
    contamination : "auto" or float in (0, 0.5], default="auto"
        Sets ``offset_`` from leave-one-image-out scores of training images
        (each scored against bank entries from the *other* images, since a
        bank scores its own patches near 0): ``"auto"`` puts the threshold at
        the highest of them, so every held-out training image passes; a float
        flags that fraction of them.
    max_threshold_images : int or None, default=100
        Training images scored leave-one-image-out for the thresholds: a
        seeded subset of this many, or all of them with None. Each costs an
        exact search of its patches through the bank, so the subset keeps
        ``fit`` linear in the number of training images. Fewer images set a
        noisier ``offset_``: on MVTec bottle, 50 of 100 gave the same test
        accuracy on average (0.984 against 0.988) but up to 25 % false alarms
        in one draw of 50, against 5 % with all 100.
    sigma : float, default=4.0
        Gaussian smoothing of the maps, in pixels of the network input.
    image_shape : (H, W) or (H, W, C), default=None
        Shape of one image when ``X`` is 2-D (flattened images); one entry
        may be -1 and is inferred from the row length.
    batch_size : int, default=4
        Images per forward pass; bounds the memory of activations. Small
        batches keep a CPU's activations in cache: EfficientNet-Lite0 at 256²
        on 2 cores took 20-26 ms per image in batches of 1 to 4 and 47 ms in
        batches of 16; at 512², 40-56 ms in batches of 1 and 75-78 ms in
        batches of 4. On a GPU, larger batches (32 and more) pay.
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
    memory : None, str or joblib.Memory, default=None
        Cache the patch features on disk (a folder path or a
        ``joblib.Memory``), keyed on the image bytes, the extractor's
        parameters, the input size and crop, ``embedding_dim`` and the
        device type. A ``GridSearchCV`` over parameters that do not touch
        the network (``coreset_ratio``, ``n_neighbors``, ``algorithm``,
        ``contamination``, ``sigma``) then runs the network once per distinct
        training fold and once per test fold instead of once per candidate,
        with identical results. The coreset selected from them is cached too
        (keyed also on ``coreset_ratio``, ``coreset_method``,
        ``projection_dim``, ``batch_size`` and ``random_state``), so
        candidates that differ only in how they score share one selection.
        Scoring is keyed on the ``feature_extractor``
        parameter too, so leave it as fitted. The cache holds float32
        features of every image it sees (``n * h * w * D * 4`` bytes per
        call); clear it with ``memory.clear()``. The last network built is
        also kept in memory: later fits in the process with the same
        extractor and device share it as their ``feature_extractor_``
        rather than build their own. None caches nothing.
    verbose : int, default=0
        Log the fitting stages and their times (``logging``, logger
        ``"skpatchcore"``, shown on stderr when logging is not configured)
        and show progress bars of the images through the network.

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
    offset_ : float
        Threshold on :meth:`score_samples`; ``decision_function = score_samples - offset_``.
    pixel_threshold_ : float
        Default threshold of :meth:`predict_masks`: the highest
        leave-one-image-out map value of the training images.
    threshold_image_indices_ : ndarray of shape (n_threshold,)
        Positions among the (normal) training images of those scored for the
        thresholds; see ``max_threshold_images``.
    train_score_samples_ : ndarray of shape (n_threshold,)
        Their leave-one-image-out :meth:`score_samples`.
    n_features_in_ : int
        Values per training image (``H * W * C``).
    image_shape_ : tuple of int
        ``(H, W, C)`` of the training images.
    feature_shape_ : tuple of int
        Patch grid and dimension ``(h, w, D)`` of the training images.
    n_samples_seen_ : int
        Normal training images the bank was built from, over :meth:`fit`
        and any :meth:`partial_fit` calls since.

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

    **Threads.** :meth:`score_samples`, :meth:`decision_function`,
    :meth:`predict`, :meth:`anomaly_maps` and :meth:`predict_masks` may be
    called from several threads on one fitted detector and give the serial
    results (pynndescent queries and hooked networks take turns on a lock;
    the rest runs concurrently). :meth:`fit` and ``set_params`` must not run
    while another thread scores. An interrupted :meth:`fit`
    (``KeyboardInterrupt``, an error) leaves the fitted attributes as they
    were: they are set together at its end.

    **Saving.** :func:`skpatchcore.save` writes a file that holds no code
    (safetensors and JSON), read back by :func:`skpatchcore.load`. A fitted
    detector also pickles (``pickle``, ``joblib.dump``) independently of its
    device: the state saved holds ``feature_extractor_`` on the CPU, so a
    detector fitted with ``device="cuda"`` loads on a machine without a GPU.
    The live detector is left as it is (the network is copied to the CPU for
    the pickle through torch's own serialisation; a network already on the CPU
    is saved without a copy). The loaded detector keeps its ``device``
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

    # Detectors pickled before this parameter existed resize by the shorter side.
    image_size_rule = "shorter_side"

    _parameter_constraints: dict = {
        "feature_extractor": [str, FeatureExtractor],
        "image_size": [Interval(Integral, 1, None, closed="left"), tuple, list, None],
        "image_size_rule": [StrOptions({"shorter_side", "area"})],
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
        "max_threshold_images": [Interval(Integral, 2, None, closed="left"), None],
        "sigma": [Interval(Real, 0, None, closed="left")],
        "image_shape": [None, tuple, list],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "device": [str, torch.device],
        "n_jobs": [Integral, None],
        "random_state": ["random_state"],
        "memory": [None, str, HasMethods(["cache"])],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        *,
        feature_extractor="wide_resnet50_2",
        image_size=256,
        image_size_rule="shorter_side",
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
        max_threshold_images=100,
        sigma=4.0,
        image_shape=None,
        batch_size=4,
        device="cpu",
        n_jobs=None,
        random_state=None,
        memory=None,
        verbose=0,
    ):
        self.feature_extractor = feature_extractor
        self.image_size = image_size
        self.image_size_rule = image_size_rule
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
        self.max_threshold_images = max_threshold_images
        self.sigma = sigma
        self.image_shape = image_shape
        self.batch_size = batch_size
        self.device = device
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.memory = memory
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
        self._check_size_params()
        device = check_device(self.device)
        images = self._training_images(X, y)
        if len(images) < 2:
            raise ValueError(
                f"PatchCore needs at least 2 normal training images (thresholds are "
                f"set by scoring each one against the others); got n_samples = {len(images)}."
            )
        coreset_seed, index_seed, threshold_seed = self._fit_seeds()
        net = self._load_network(device)
        size = resized_shape(images.shape[1:3], self.image_size, self.image_size_rule)
        box = crop_box(size, self.crop_size)
        # Large feature sets go to a file in here; removed however fit ends.
        with tempfile.TemporaryDirectory(prefix="skpatchcore-") as folder:
            start = time.perf_counter()
            features, projected = self._extract_for_fit(
                net, images, size, box, device, coreset_seed, folder
            )
            n_images, h, w, dim = features.shape
            self._log(f"extracted {n_images * h * w} patch features of {n_images} images "
                      f"({h}x{w} grid, {dim} dims)", start)

            start = time.perf_counter()
            coreset = cached_coreset(
                self.memory, projected, images, coreset_ratio=self.coreset_ratio,
                method=self.coreset_method, seed=coreset_seed, projection_dim=self.projection_dim,
                batch_size=self.batch_size,
                features=functools.partial(self._feature_key, size, box, device),
            )
            del projected
            bank = patch_rows(features, coreset)
            self._log(f"coreset of {len(bank)} entries", start)

            index = self._build_index(bank, n_images * h * w, index_seed, device)
            start = time.perf_counter()
            held_out = self._threshold_images(n_images, threshold_seed)
            loo_scores, pixel_max = self._leave_one_out(
                index, image_features(features, held_out), held_out, coreset // (h * w), size, box
            )
            del features
            self._log(f"leave-one-image-out thresholds of {len(held_out)} images", start)

        self._set_fitted(
            net, index, coreset, held_out, loo_scores, pixel_max,
            images.shape[1:], (h, w, dim), n_images,
        )
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None):
        """Extend the memory bank with more normal images, without refitting.

        The first call on an unfitted detector is :meth:`fit`. Later calls
        extract the new images' patch features and continue greedy k-center
        from the current bank: its rows are the first centres, and new patches
        are added, farthest first, until the bank holds ``coreset_ratio`` of
        all the patches seen (``n_samples_seen_`` images). Bank rows are never
        removed, and the old images' patches are not revisited (they are not
        kept): each is already within the old covering radius of the bank,
        and new rows can only bring it closer.

        The thresholds are updated, not recomputed: up to
        ``max_threshold_images`` of the new images are scored
        leave-one-image-out against the grown bank and join the earlier
        images' scores in ``train_score_samples_``; ``offset_`` is set again
        from all of them, and ``pixel_threshold_`` is the larger of the old one
        and the new images' highest map value. The earlier scores were taken
        against the smaller bank, so they lean anomalous and the threshold
        leans towards passing images, compared with a refit.

        Parameters
        ----------
        X : array-like of shape (n_samples, H, W, C), (n_samples, H, W) or (n_samples, H*W*C)
            New normal images; they must give the patch grid of the first
            fit (``feature_shape_``), so the same size after ``image_size``.
        y : array-like of shape (n_samples,) or (n_samples, H, W), default=None
            As in :meth:`fit`: only rows with ``y == 0`` (or an empty mask) are used.

        Returns
        -------
        self : PatchCoreDetector
            Extended. A failed call raises before changing any fitted attribute.

        Notes
        -----
        Compared with a refit on all the images, the bank differs where the
        refit would have dropped old rows in favour of new patches; the
        covering radius of ``partial_fit`` is at most the larger of the old
        radius and that of the new patches, measured by
        :func:`~skpatchcore.coreset.covering_radius`. On MVTec bottle, fit on
        50 images plus ``partial_fit`` on 50 more gave 0.978 times the radius
        of a refit on the 100, with the same image and pixel AUROC to 1e-4
        (:doc:`/scaling`). Like scikit-learn's
        incremental estimators, :func:`~sklearn.base.clone` returns an
        unfitted copy and a pickled detector continues where it stopped:
        the same calls give the same bank.

        Examples
        --------
        >>> from skpatchcore import PatchCoreDetector, TorchvisionExtractor
        >>> from skpatchcore.datasets import make_anomaly_images
        >>> X, y, _ = make_anomaly_images(24, image_size=64, random_state=0)
        >>> good = X[y == 0]
        >>> det = PatchCoreDetector(
        ...     feature_extractor=TorchvisionExtractor("resnet18", weights=None),
        ...     image_size=64, random_state=0,
        ... ).fit(good[:6])
        >>> det.partial_fit(good[6:]).n_samples_seen_ == len(good)
        True
        """
        if not hasattr(self, "memory_bank_"):
            return self.fit(X, y)  # parameters already validated: the nested call skips it
        if not hasattr(self, "n_samples_seen_"):
            raise ValueError(
                "This detector was fitted by an earlier skpatchcore that did not record "
                "n_samples_seen_; refit it before extending it with partial_fit."
            )
        self._check_size_params()
        self._check_n_features(X)
        device = check_device(self.device)
        images = self._training_images(X, y)
        if len(images) == 0:
            raise ValueError("partial_fit got no normal images (y == 0) to add.")
        if images.shape[-1] != self.image_shape_[-1]:
            raise ValueError(
                f"Images have {images.shape[-1]} channel(s) but the detector was fitted on "
                f"{self.image_shape_[-1]}-channel images."
            )
        coreset_seed, index_seed, threshold_seed = self._fit_seeds()
        net = self.feature_extractor_.to(device)
        size = resized_shape(images.shape[1:3], self.image_size, self.image_size_rule)
        box = crop_box(size, self.crop_size)
        old_bank, n_old = self.memory_bank_, self.n_samples_seen_
        with tempfile.TemporaryDirectory(prefix="skpatchcore-") as folder:
            start = time.perf_counter()
            features, projected = self._extract_for_fit(
                net, images, size, box, device, coreset_seed, folder, leading=old_bank,
                n_previous_images=n_old,
            )
            n_images, h, w, dim = features.shape
            if (h, w, dim) != tuple(self.feature_shape_):
                raise ValueError(
                    f"The new images give {h}x{w} patches of {dim} dims, but the detector was "
                    f"fitted on {self.feature_shape_[0]}x{self.feature_shape_[1]} patches of "
                    f"{self.feature_shape_[2]} dims: pass images of the training size "
                    f"{self.image_shape_[:2]}."
                )
            self._log(f"extracted {n_images * h * w} patch features of {n_images} new images", start)

            start = time.perf_counter()
            n_bank = max(len(old_bank), coreset_size(self.coreset_ratio, (n_old + n_images) * h * w))
            selected, _ = projected.select(
                n_selected=n_bank, initial=np.arange(len(old_bank)), method=self.coreset_method
            )
            del projected
            added = selected[len(old_bank):] - len(old_bank)  # among the new patches
            bank = np.concatenate([old_bank, patch_rows(features, added)])
            coreset = np.concatenate([self.coreset_indices_, n_old * h * w + added])
            self._log(f"coreset grown by {len(added)} to {len(bank)} entries", start)

            index = self._build_index(bank, (n_old + n_images) * h * w, index_seed, device)
            start = time.perf_counter()
            held_out = self._threshold_images(n_images, threshold_seed)
            loo_scores, pixel_max = self._leave_one_out(
                index, image_features(features, held_out), n_old + held_out,
                coreset // (h * w), size, box,
            )
            del features
            self._log(f"leave-one-image-out thresholds of {len(held_out)} new images", start)

        self._set_fitted(
            net, index, coreset,
            np.concatenate([self.threshold_image_indices_, n_old + held_out]),
            np.concatenate([-self.train_score_samples_, loo_scores]),
            max(self.pixel_threshold_, pixel_max),
            self.image_shape_, self.feature_shape_, n_old + n_images,
        )
        return self

    def _check_size_params(self) -> None:
        """``image_size``, ``crop_size`` and ``tile_size``: what the constraints cannot say."""
        for name in ("image_size", "crop_size", "tile_size"):
            value = getattr(self, name)
            if value is not None and not _size_spec(value):
                raise ValueError(
                    f"{name} must be a positive int, a (height, width) pair of positive "
                    f"ints or None; got {value!r}."
                )

    def _check_n_features(self, X) -> None:
        """Flattened images (2-D ``X``) must have the training images' length."""
        if np.ndim(X) == 2 and np.shape(X)[1] != self.n_features_in_:
            raise ValueError(
                f"X has {np.shape(X)[1]} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input."
            )

    def _training_images(self, X, y) -> np.ndarray:
        """The normal images of ``X`` (``y == 0``), checked, of one network input size."""
        images = common_size_images(
            X, self.image_size, image_shape=self.image_shape, rule=self.image_size_rule
        )
        if y is not None:
            images = images[self._normal_rows(y, len(images))]
        return images

    def _fit_seeds(self) -> tuple[int, int, int]:
        """Seeds of the coreset, the index and the threshold subset."""
        rng = check_random_state(self.random_state)
        return tuple(int(seed) for seed in rng.randint(np.iinfo(np.int32).max, size=3))

    def _load_network(self, device):
        extractor = self.feature_extractor
        if isinstance(extractor, str):
            extractor = TorchvisionExtractor(extractor)
        return load_network(extractor, self.memory, device)

    def _build_index(self, bank, n_queries: int, seed: int, device) -> NearestNeighborIndex:
        """The nearest-neighbour index over ``bank``, its backend chosen for ``n_queries``."""
        start = time.perf_counter()
        index = NearestNeighborIndex(
            algorithm=self.algorithm, expected_n_queries=n_queries,
            random_state=seed, n_jobs=self.n_jobs, device=device,
        ).fit(bank)
        self._log(f"{index.algorithm_} nearest-neighbour index", start)
        return index

    def _set_fitted(
        self, net, index, coreset, held_out, loo_scores, pixel_threshold, image_shape,
        feature_shape, n_images,
    ) -> None:
        """Set every fitted attribute at once, from a finished fit."""
        self.feature_extractor_ = net
        self.memory_bank_ = index.bank_  # the index's array: one copy of the bank, not two
        self.coreset_indices_ = coreset
        self.nn_index_ = index
        self.threshold_image_indices_ = held_out
        self.train_score_samples_ = -loo_scores
        if self.contamination == "auto":
            self.offset_ = float(self.train_score_samples_.min())
        else:
            self.offset_ = float(np.percentile(self.train_score_samples_, 100.0 * self.contamination))
        self.pixel_threshold_ = pixel_threshold
        self.image_shape_ = tuple(image_shape)
        self.n_features_in_ = int(np.prod(self.image_shape_))
        self.feature_shape_ = tuple(feature_shape)
        self.n_samples_seen_ = int(n_images)

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
        log(f"PatchCoreDetector: {message} in {time.perf_counter() - start:.1f} s", self.verbose)

    def _feature_key(self, size, box, device) -> dict:
        return feature_key(
            self.feature_extractor, size=size, box=box, embedding_dim=self.embedding_dim,
            device=device, tile_size=self.tile_size, tile_overlap=self.tile_overlap,
        )

    def _patch_batches(self, net, images, size, box, device):
        """``(batch_slice, patches (b, h, w, D))`` of ``images``, batch by batch."""
        return cached_patch_embeddings(
            self.memory, self.feature_extractor, net, images, size=size, box=box,
            embedding_dim=self.embedding_dim, batch_size=self.batch_size, device=device,
            tile_size=self.tile_size, tile_overlap=self.tile_overlap, verbose=self.verbose,
        )

    def _extract_for_fit(
        self, net, images, size, box, device, coreset_seed, folder, *, leading=None,
        n_previous_images=0,
    ):
        """Stream the training images' patch features into a store.

        Each batch is kept (in float32 while that fits ``_IN_MEMORY_FEATURE_BYTES``;
        beyond, in a float16 :class:`FeatureFile` in ``folder``) and projected
        for the coreset as it comes, so that large sets never exist in float32.
        ``leading`` (a bank being extended) is projected first, ahead of the
        images' patches; ``n_previous_images`` counts the images it came from,
        for the size of the bank planned.

        Returns
        -------
        features : ndarray of shape (n, h, w, D), float32, or FeatureFile of that shape
        projected : ProjectedRows
            Filled with ``leading`` and every patch, ready to select the coreset.
        """
        features = projected = None
        try:
            for batch, patches in self._patch_batches(net, images, size, box, device):
                if features is None:
                    features, projected = self._allocate_for_fit(
                        len(images), patches, coreset_seed, folder, leading, n_previous_images
                    )
                features[batch] = patches.cpu().numpy()  # cast to the store's dtype
                projected.add(patches.reshape(-1, patches.shape[-1]))
        except RuntimeError as exc:
            if "size" not in str(exc).lower():
                raise
            raise ValueError(
                f"Images of {box[2]}x{box[3]} pixels are too small for the backbone "
                f"({exc}). Use a larger image_size."
            ) from exc
        finally:
            if isinstance(features, FeatureFile):
                features.close()  # written; and the temporary folder can go, also on Windows
        return features, projected

    def _allocate_for_fit(self, n_images, first_batch, coreset_seed, folder, leading, n_previous_images):
        """The feature store and the coreset's projected copy, sized on the first batch."""
        _, h, w, dim = first_batch.shape
        if min(h, w) < 3:
            # The 3x3 neighbourhood aggregation needs a grid to aggregate over.
            raise ValueError(
                f"Images of {first_batch.shape[1:3]} patches are too small: at least a 3x3 "
                "patch grid is needed. Use a larger image_size."
            )
        n_patches = n_images * h * w
        n_leading = 0 if leading is None else len(leading)
        if leading is not None and leading.shape[1] != dim:
            raise ValueError(
                f"The new images give patch features of {dim} dims, but the memory bank "
                f"has {leading.shape[1]}."
            )
        n_bank = coreset_size(self.coreset_ratio, n_patches + n_previous_images * h * w)
        if n_bank < self.n_neighbors:
            raise ValueError(
                f"The coreset would keep {n_bank} of {n_patches} patches, fewer than "
                f"n_neighbors={self.n_neighbors} needed by the score reweighting. Use more "
                "images, a larger image_size or coreset_ratio, or a smaller n_neighbors."
            )
        projection_dim = dim if self.projection_dim is None else min(self.projection_dim, dim)
        in_memory = 4 * n_patches * dim <= _IN_MEMORY_FEATURE_BYTES
        check_fits_in_memory(
            {
                "the coreset's projected features": 4 * (n_leading + n_patches) * projection_dim,
                "the memory bank": 4 * max(n_bank, n_leading) * dim,
                "patch features": 4 * n_patches * dim if in_memory else 0,
            },
            "Lower coreset_ratio, projection_dim or image_size, or fit on fewer images.",
        )
        shape = (n_images, h, w, dim)
        if in_memory:
            features = empty(shape)
        else:
            features = FeatureFile(os.path.join(folder, "features.npy"), shape)
        projected = ProjectedRows(
            n_leading + n_patches, dim, projection_dim=self.projection_dim, dtype="float32",
            random_state=coreset_seed, device=first_batch.device,
        )
        if leading is not None:
            for rows in gen_batches(n_leading, _LEADING_BATCH_ROWS):
                projected.add(torch.from_numpy(leading[rows]))
        return features, projected

    def _threshold_images(self, n_images: int, seed: int) -> np.ndarray:
        """Training images scored for the thresholds: all, or a seeded subset."""
        if self.max_threshold_images is None or self.max_threshold_images >= n_images:
            return np.arange(n_images)
        rng = np.random.RandomState(seed)
        return np.sort(rng.choice(n_images, self.max_threshold_images, replace=False))

    def _leave_one_out(self, index, patches, held_out, bank_groups, size, box):
        """Image scores and largest map value of held-out training images against the others' bank entries.

        Parameters
        ----------
        index : NearestNeighborIndex
            Fitted on the bank.
        patches : ndarray of shape (m, h, w, D), float32
            Patch features of the training images ``held_out``.
        held_out : ndarray of shape (m,)
            Their positions among the training images, the groups of ``bank_groups``.

        Returns
        -------
        scores : ndarray of shape (m,)
        pixel_max : float
            The largest value of their maps.
        """
        n_images, h, w, dim = patches.shape
        bank = index.bank_
        if np.bincount(bank_groups).max() == len(bank):
            raise ValueError(
                "Every coreset entry comes from one training image, so it cannot be "
                "scored against the others; increase coreset_ratio."
            )
        flat = patches.reshape(n_images, h * w, dim)
        _, patch, nearest, bounds = index.largest_nearest(
            flat, groups=held_out, bank_groups=bank_groups, return_bounds=True
        )
        # Each image may only use the entries of the others.
        k = min(self.n_neighbors, len(bank) - np.bincount(bank_groups).max())
        _, support = exact_kneighbors(
            bank[nearest], bank, k, query_groups=held_out, bank_groups=bank_groups,
            device=self.device,
        )
        scores = reweighted_scores(flat[np.arange(n_images), patch], bank, support)

        def largest_map_values(dist):
            maps = anomaly_maps(
                torch.from_numpy(dist.reshape(-1, h, w)), model_size=size, box=box,
                output_size=size, sigma=self.sigma,
            )
            return maps.amax(dim=(1, 2)).numpy()

        # A map grows with its patch distances (bilinear upsampling and a
        # normalised blur average them), so the maps of the search's upper
        # bounds lie above the true ones, and usually on them: only images whose
        # bound map can still beat the largest true value are searched in full.
        upper = np.concatenate([
            largest_map_values(bounds[rows])
            for rows in gen_batches(n_images, _THRESHOLD_MAP_BATCH)
        ])
        # float32 rounding: squared distances off by up to 1e-6 (|x|² + |b|²).
        tolerance = np.sqrt(1e-6 * (np.einsum("ijk,ijk->ij", flat, flat).max() + index.bank_sq_norms_.max()))
        pixel_max = 0.0
        for image in np.argsort(-upper, kind="stable"):
            if upper[image] + tolerance < pixel_max:
                break
            dist, _ = exact_kneighbors(
                flat[image], bank, 1, bank_sq_norms=index.bank_sq_norms_,
                query_groups=np.full(h * w, held_out[image]), bank_groups=bank_groups,
                device=self.device,
            )
            pixel_max = max(pixel_max, float(largest_map_values(dist)[0]))
        return scores, pixel_max

    # -------------------------------------------------------------- scoring
    def _score(self, X, *, with_maps: bool):
        """Image anomaly scores ``(n,)`` and, if asked, maps ``(n, H, W)``.

        Images of different sizes (a list) are scored in groups of one size;
        their maps come back as a list of ``(H_i, W_i)`` arrays.
        """
        check_is_fitted(self)
        groups = size_groups(X)
        if groups is not None:
            return self._score_groups(groups, with_maps=with_maps)
        self._check_n_features(X)
        images = check_images(X, image_shape=self.image_shape)
        if images.shape[-1] != self.image_shape_[-1]:
            raise ValueError(
                f"Images have {images.shape[-1]} channel(s) but the detector was fitted on "
                f"{self.image_shape_[-1]}-channel images."
            )
        device = check_device(self.device)
        # Network and exact search both follow the device set now, not the one of fit: a
        # detector fitted on a GPU scores on the CPU after set_params(device="cpu").
        net = self.feature_extractor_
        if next(net.parameters(), torch.empty(0)).device != device:
            net = net.to(device)  # walks every parameter: 2 ms a call for Lite0
        self.nn_index_.set_params(device=device)
        size = resized_shape(images.shape[1:3], self.image_size, self.image_size_rule)
        box = crop_box(size, self.crop_size)
        scores = np.empty(len(images), dtype=np.float32)
        maps = empty((len(images), *images.shape[1:3])) if with_maps else None
        # Image scores alone search more images a call than the network takes
        # (cheaper per image); maps keep the network's batches.
        search_bytes = 1 if with_maps else SEARCH_BYTES
        patch_batches = self._patch_batches(net, images, size, box, device)
        for batch, patches in search_batches(patch_batches, search_bytes):
            n, h, w, dim = patches.shape
            flat = patches.reshape(n, h * w, dim)
            scores[batch], dist = image_scores(
                self.nn_index_, flat, self.n_neighbors, patch_distances=with_maps, grid=(h, w)
            )
            if with_maps:
                maps[batch] = anomaly_maps(
                    torch.from_numpy(dist.reshape(n, h, w)), model_size=size, box=box,
                    output_size=images.shape[1:3], sigma=self.sigma,
                ).numpy()
        return scores, maps

    def _score_groups(self, groups, *, with_maps: bool):
        """:meth:`_score` of each group of equal-sized images, in input order."""
        n_images = sum(len(positions) for positions, _ in groups)
        scores = np.empty(n_images, dtype=np.float32)
        maps = [None] * n_images if with_maps else None
        for positions, images in groups:
            scores[positions], group_maps = self._score(images, with_maps=with_maps)
            for position, image_map in zip(positions, group_maps if with_maps else ()):
                maps[position] = image_map
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
        maps : ndarray of shape (n_samples, H, W), float32, or list
            Higher is more anomalous (not negated, unlike
            :meth:`score_samples`); values are patch distances. For a list of
            images of different sizes, a list of ``(H_i, W_i)`` maps, one per image.
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
        masks : ndarray of shape (n_samples, H, W), bool, or list
            A list of ``(H_i, W_i)`` masks for images of different sizes.
        """
        check_is_fitted(self)
        threshold = self.pixel_threshold_ if threshold is None else threshold
        maps = self.anomaly_maps(X)
        if isinstance(maps, list):  # images of different sizes
            return [image_map > threshold for image_map in maps]
        return maps > threshold

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
