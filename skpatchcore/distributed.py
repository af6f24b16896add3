"""PatchCore on a Dask cluster: distributed scoring, sharded fit, a sharded memory bank.

Everything here runs on a ``distributed.Client`` (the default client unless
one is passed): no cluster of our own. Install with
``pip install "skpatchcore[dask]"``; ``import skpatchcore`` never imports Dask.

* :func:`score_samples_distributed` scores image files (or a dask array of
  images) on the workers, the fitted detector sent to each worker once.
* :func:`fit_sharded` fits a detector on shards of the training images, one
  coreset per shard and one greedy pass over their union
  (:func:`~skpatchcore.coreset.merge_coresets` states the bound).
* :class:`ShardedIndex` holds a memory bank split over the workers, for banks
  larger than one worker's memory; :func:`shard_memory_bank` gives a detector
  that searches it, with the scores of the unsharded detector.
* :class:`TorchThreads` sets torch's threads on every worker, so that workers
  sharing a machine do not oversubscribe its cores (e.g. under
  ``joblib.parallel_config(backend="dask")`` for a ``GridSearchCV``).

See :doc:`/scaling` for what each piece costs and changes.
"""

from __future__ import annotations

try:
    import dask
    import distributed
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        'skpatchcore.distributed needs Dask: pip install "skpatchcore[dask]"'
    ) from exc

import asyncio
import logging
import math
import os
import shutil
import tempfile
import threading
import time
import weakref
from itertools import cycle
from numbers import Integral
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.base import BaseEstimator, _fit_context, clone
from sklearn.utils import check_array
from sklearn.utils._param_validation import Interval, StrOptions, validate_params
from sklearn.utils.validation import check_is_fitted

from ._device import check_device
from ._memory import image_features, patch_rows
from .coreset import coreset_size, merge_coresets
from .detector import PatchCoreDetector
from .images import crop_box, resized_shape
from .neighbors import NearestNeighborIndex
from .reader import ImageReader, _check_paths
from .scoring import max_patches

__all__ = [
    "ShardedIndex",
    "TorchThreads",
    "fit_sharded",
    "score_samples_distributed",
    "shard_memory_bank",
]

# Images per scoring task when not given: enough to amortise a task's overhead
# (a few ms) against the network (20-50 ms per image on a CPU core).
_IMAGES_PER_TASK = 16
# How long TorchThreads waits for a worker's busy task threads.
_THREAD_SETUP_S = 60.0


def _get_client(client):
    if client is not None:
        return client
    try:
        return distributed.get_client()
    except ValueError as exc:
        raise ValueError(
            "No Dask client: start one (distributed.Client(...), or a LocalCluster) or "
            "pass client=."
        ) from exc


def _is_dask_array(X) -> bool:
    return dask.is_dask_collection(X) and hasattr(X, "chunks")


def _n_workers(client) -> int:
    return max(1, len(client.scheduler_info(n_workers=-1)["workers"]))


def _parts(X, sizes, client):
    """``X`` cut into consecutive parts of ``sizes`` images: path lists, or futures of
    dask array blocks (computed on the workers, never on the client)."""
    if _is_dask_array(X):
        X = X.rechunk({0: tuple(sizes), **{axis: -1 for axis in range(1, X.ndim)}})
        return client.compute(list(X.to_delayed().ravel()))
    stops = np.cumsum(sizes)
    return [X[stop - size : stop] for size, stop in zip(sizes, stops)]


def _read(part, reader):
    """Images of one part, on a worker: array blocks as they are, paths through ``reader``."""
    return part if isinstance(part, np.ndarray) else reader.transform(part)


def _check_input(X):
    """Images as a dask or NumPy array (n, H, W[, C]), or a list of paths."""
    if _is_dask_array(X) or (isinstance(X, np.ndarray) and X.dtype.kind in "uif"):
        if X.ndim not in (3, 4):
            raise ValueError(
                f"An array of images must be (n, H, W) or (n, H, W, C); got shape {X.shape}."
            )
        return X
    return _check_paths(X)


# --------------------------------------------------------------------- scoring
def _score_part(detector, part, reader, *, with_maps, folder, map_format, map_max, names):
    """Scores (and maps, or the files they were written to) of one part, on a worker."""
    images = _read(part, reader)
    if not with_maps:
        return detector.score_samples(images), None
    maps, scores = detector.anomaly_maps(images, return_score_samples=True)
    if folder is None:
        return scores, list(maps)
    written = []
    for image_map, name in zip(maps, names):
        path = os.path.join(folder, f"{name}.{map_format}")
        if map_format == "npy":
            np.save(path, image_map)
        else:
            levels = np.clip(np.asarray(image_map) / map_max, 0.0, 1.0) * 65535.0
            Image.fromarray(np.round(levels).astype(np.uint16)).save(path)
        written.append(path)
    return scores, written


@validate_params(
    {
        "detector": [PatchCoreDetector],
        "X": ["array-like"],
        "reader": [ImageReader, None],
        "images_per_task": [Interval(Integral, 1, None, closed="left"), None],
        "return_maps": ["boolean"],
        "maps_folder": [str, os.PathLike, None],
        "map_format": [StrOptions({"npy", "png"})],
        "client": [None, distributed.Client],
    },
    prefer_skip_nested_validation=True,
)
def score_samples_distributed(
    detector: PatchCoreDetector,
    X,
    *,
    reader: ImageReader | None = None,
    images_per_task: int | None = None,
    return_maps: bool = False,
    maps_folder: str | os.PathLike | None = None,
    map_format: str = "npy",
    client: distributed.Client | None = None,
):
    """``score_samples`` (and ``anomaly_maps``) of many images on a Dask cluster.

    The fitted detector is sent to every worker once (scattered with
    ``broadcast=True``), not pickled with each task. Each task reads its own
    images (files through ``reader`` on the worker, or one block of a dask
    array where that block lives) and scores them; results come back in the
    input order. On the CPU, scores and maps are bit-identical to
    ``detector.score_samples(reader.transform(X))`` and ``anomaly_maps`` run
    with the workers' torch thread count: tasks start at multiples of
    ``detector.batch_size``, so the network sees the same batches. (CPU
    convolutions round differently with another thread count: EfficientNet-Lite0
    scores moved by about 4e-6 between 1 and 2 threads.)

    Parameters
    ----------
    detector : PatchCoreDetector
        Fitted.
    X : list of str or path-like, or array of shape (n, H, W[, C])
        Image files, which every worker must be able to read (a shared
        file system or object store mounted alike); or images as a dask
        array (chunked along the first axis any way; re-chunked to
        ``images_per_task``, each block scored where it is computed), or as a
        NumPy array (sent to the workers part by part).
    reader : ImageReader, default=None
        Reads the files on the workers; ``None`` is ``ImageReader()`` (files
        at their own size, resized by the detector's ``image_size``).
        Ignored for a dask array.
    images_per_task : int, default=None
        Images per task, rounded up to a multiple of ``detector.batch_size``;
        ``None`` takes 16 so rounded. Fewer, larger tasks cost less overhead;
        more tasks balance the workers better.
    return_maps : bool, default=False
        Also return the anomaly maps.
    maps_folder : str or path-like, default=None
        Write each image's map into this folder (which the workers must be
        able to write) instead of returning it, and return the files' paths.
        Files are named by input position, zero-padded, plus the source
        file's stem (``000017_broken_003.npy``), so none collide.
    map_format : {"npy", "png"}, default="npy"
        ``"npy"``: the float32 map as it is. ``"png"``: a 16-bit grayscale
        image of ``map / (2 * pixel_threshold_)``, clipped to [0, 1], so that
        the detector's pixel threshold is mid-grey (32768) and
        :class:`~skpatchcore.ImageReader` reads back ``map / (2 *
        pixel_threshold_)``.
    client : distributed.Client, default=None
        ``None`` uses the default client (the last one created).

    Returns
    -------
    score_samples : ndarray of shape (n,), float32
        As :meth:`PatchCoreDetector.score_samples`, in input order.
    maps : list of ndarray, or list of str
        Only with ``return_maps`` (the maps) or ``maps_folder`` (the paths
        written), in input order.

    See Also
    --------
    PatchCoreDetector.score_samples : The same on one machine.

    Examples
    --------
    >>> from distributed import Client, LocalCluster
    >>> from skpatchcore.distributed import score_samples_distributed
    >>> client = Client(LocalCluster(n_workers=2, threads_per_worker=1))  # doctest: +SKIP
    >>> scores = score_samples_distributed(detector, paths)  # doctest: +SKIP
    >>> scores, files = score_samples_distributed(detector, paths, maps_folder="maps")  # doctest: +SKIP
    """
    check_is_fitted(detector)
    if return_maps and maps_folder is not None:
        raise ValueError("Pass return_maps=True or maps_folder, not both.")
    client = _get_client(client)
    X = _check_input(X)
    reader = ImageReader() if reader is None else reader
    n = len(X)
    if n == 0:
        raise ValueError("Found 0 images to score; at least 1 is required.")
    step = detector.batch_size * math.ceil((images_per_task or _IMAGES_PER_TASK) / detector.batch_size)
    sizes = [min(step, n - start) for start in range(0, n, step)]
    names = _map_names(X, n)
    if maps_folder is not None:
        maps_folder = os.fspath(maps_folder)
        os.makedirs(maps_folder, exist_ok=True)
    with_maps = return_maps or maps_folder is not None
    shared = client.scatter(detector, broadcast=True, hash=False)
    try:
        futures = [
            client.submit(
                _score_part, shared, part, reader, with_maps=with_maps, folder=maps_folder,
                map_format=map_format, map_max=2.0 * detector.pixel_threshold_,
                names=names[start : start + size], pure=False,
            )
            for part, start, size in zip(_parts(X, sizes, client), np.cumsum([0, *sizes]), sizes)
        ]
        results = client.gather(futures)
    finally:
        shared.release()
    scores = np.concatenate([part_scores for part_scores, _ in results])
    if not with_maps:
        return scores
    return scores, [item for _, part_maps in results for item in part_maps]


def _map_names(X, n: int) -> list[str]:
    width = max(6, len(str(n - 1)))
    if not isinstance(X, list):  # an array of images
        return [f"{i:0{width}d}" for i in range(n)]
    return [f"{i:0{width}d}_{Path(path).stem}" for i, path in enumerate(X)]


# ----------------------------------------------------------------- sharded fit
class _FitJob:
    """What every shard needs, sent to each worker once: parameters, network, seeds."""

    def __init__(self, detector, net, coreset_seed, n_images):
        self.detector, self.net = detector, net
        self.coreset_seed, self.n_images = coreset_seed, n_images


class _Shard:
    """A shard's patch features and coreset, kept on its worker between tasks.

    A large shard's features live in a file (``skpatchcore._memory.FeatureFile``) of a
    temporary folder, removed with the shard (or read into memory if Dask
    moves it).
    """

    def __init__(self, job, images, offset):
        detector = job.detector
        device = check_device(detector.device)
        self.offset = offset
        self.image_shape = images.shape[1:]
        self.size = resized_shape(images.shape[1:3], detector.image_size, detector.image_size_rule)
        self.box = crop_box(self.size, detector.crop_size)
        self._folder = tempfile.mkdtemp(prefix="skpatchcore-shard-")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._folder, ignore_errors=True)
        start = time.perf_counter()
        # The shard plans for the whole fit's bank (which its thresholds will search).
        self.features, projected = detector._extract_for_fit(
            job.net.to(device), images, self.size, self.box, device, job.coreset_seed, self._folder,
            n_previous_images=job.n_images - len(images),
        )
        n, h, w, dim = self.features.shape
        self.extract_s = time.perf_counter() - start
        start = time.perf_counter()
        # k centres per shard, k being the final bank size: the composable coreset of
        # merge_coresets, whose bound needs each shard's greedy at the full k.
        n_bank = coreset_size(detector.coreset_ratio, job.n_images * h * w)
        self.indices, self.radius = projected.select(
            n_selected=min(n_bank, n * h * w), method=detector.coreset_method
        )
        self.coreset_s = time.perf_counter() - start

    def summary(self):
        """What the client needs for the union pass: this shard's coreset rows and shapes."""
        n, h, w, dim = self.features.shape
        rows = patch_rows(self.features, self.indices)
        return {
            "rows": rows, "indices": self.offset * h * w + self.indices, "radius": self.radius,
            "n_images": n, "feature_shape": (h, w, dim), "image_shape": self.image_shape,
            "size": self.size, "box": self.box, "extract_s": self.extract_s,
            "coreset_s": self.coreset_s, "worker": distributed.get_worker().address,
        }

    def leave_one_out(self, detector, bank, bank_groups, held_out):
        """Leave-one-image-out scores and largest map value of this shard's ``held_out`` images."""
        patches = image_features(self.features, held_out - self.offset)
        # An exact index of the bank here (its cells cost one pass over the bank):
        # the client's may hold a pynndescent graph not worth shipping.
        index = NearestNeighborIndex("exact", device=detector.device).fit(bank)
        return detector._leave_one_out(index, patches, held_out, bank_groups, self.size, self.box)

    def __getstate__(self):
        # A file does not travel: a shard moved (or spilled) by Dask goes in memory.
        state = {key: value for key, value in self.__dict__.items() if key not in ("_cleanup", "_folder")}
        state["features"] = np.asarray(self.features)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._folder = None


def _extract_shard(job, part, reader, offset):
    return _Shard(job, job.detector._training_images(_read(part, reader), None), offset)


@validate_params(
    {
        "detector": [PatchCoreDetector],
        "X": ["array-like"],
        "reader": [ImageReader, None],
        "n_shards": [Interval(Integral, 1, None, closed="left"), None],
        "client": [None, distributed.Client],
    },
    prefer_skip_nested_validation=True,
)
def fit_sharded(
    detector: PatchCoreDetector,
    X,
    *,
    reader: ImageReader | None = None,
    n_shards: int | None = None,
    client: distributed.Client | None = None,
) -> PatchCoreDetector:
    """Fit a detector on shards of the training images, on a Dask cluster.

    1. The images are cut into ``n_shards`` consecutive shards. On its
       worker, each shard reads its images, extracts their patch features
       and keeps the greedy coreset of ``k`` of them, ``k`` being the final
       bank size (``coreset_ratio`` of all training patches), in the
       projection every shard shares (the same ``random_state``).
    2. The client gathers the shards' coreset rows (``n_shards * k`` at
       most) and runs one greedy pass over their union
       (:func:`~skpatchcore.coreset.merge_coresets`): the memory bank, and
       the index over it.
    3. The bank goes to every worker once; each shard scores its images of
       the threshold subset leave-one-image-out, as :meth:`~PatchCoreDetector.fit`
       does, and the client sets ``offset_`` and ``pixel_threshold_``.

    Features never leave their worker: only the coreset rows (step 2) and
    per-image scores (step 3) travel. The fitted detector has the attributes
    of :meth:`~PatchCoreDetector.fit`, with ``coreset_indices_`` numbering
    the patches of all images in input order; it scores on one machine, or
    with :func:`score_samples_distributed`.

    **Bound.** In the selection space, every training patch lies within
    ``max_i r_i + r_U <= 4 OPT`` of the bank, ``r_i`` being shard ``i``'s
    greedy radius, ``r_U`` the union pass's and ``OPT`` the best possible
    radius of ``k`` centres (Notes of
    :func:`~skpatchcore.coreset.merge_coresets`); so at most 4 times the
    radius of a single machine's greedy. ``verbose`` logs both radii. With
    one shard the result is :meth:`~PatchCoreDetector.fit`'s. On MVTec bottle
    (100 images, EfficientNet-Lite0, 2 shards) the covering radius was 1.003
    times the single fit's, image AUROC 1.0000 for both and pixel AUROC
    0.9875 against 0.9876 (:doc:`/scaling`).

    Parameters
    ----------
    detector : PatchCoreDetector
        Its parameters are used (validated as :meth:`~PatchCoreDetector.fit`
        does); it is fitted in place.
    X : list of str or path-like, or array of shape (n, H, W[, C])
        Normal training images: files every worker can read, or a dask array
        (re-chunked into the shards, each computed on a worker), or a NumPy
        array. They must all give one network input size (set
        ``image_size=(h, w)`` for files of different sizes).
    reader : ImageReader, default=None
        Reads the files on the workers; ``None`` is ``ImageReader()``.
    n_shards : int, default=None
        Shards of the training images; ``None``: one per worker. A shard
        keeps up to ``k`` rows, so the union pass handles ``n_shards * k``
        rows: beyond ``1 / coreset_ratio`` shards it handles every patch.
    client : distributed.Client, default=None
        ``None`` uses the default client.

    Returns
    -------
    detector : PatchCoreDetector
        Fitted. A failure raises before any fitted attribute changes.

    See Also
    --------
    PatchCoreDetector.fit : The same on one machine.
    PatchCoreDetector.partial_fit : Add images to a fitted bank.

    Examples
    --------
    >>> from skpatchcore import PatchCoreDetector, EfficientNetLite0Extractor
    >>> from skpatchcore.distributed import fit_sharded
    >>> det = PatchCoreDetector(feature_extractor=EfficientNetLite0Extractor(), random_state=0)
    >>> fit_sharded(det, train_paths, n_shards=4)  # doctest: +SKIP
    """
    detector._validate_params()
    detector._check_size_params()
    client = _get_client(client)
    X = _check_input(X)
    n_images = len(X)
    if n_images < 2:
        raise ValueError(f"PatchCore needs at least 2 normal training images; got {n_images}.")
    reader = ImageReader() if reader is None else reader
    n_shards = min(n_images, n_shards or _n_workers(client))
    sizes = [len(shard) for shard in np.array_split(np.arange(n_images), n_shards)]
    offsets = np.cumsum([0, *sizes])[:-1]
    device = check_device(detector.device)
    coreset_seed, index_seed, threshold_seed = detector._fit_seeds()
    net = detector._load_network("cpu")  # loaded here once, not on every worker
    start = time.perf_counter()
    job = client.scatter(_FitJob(clone(detector), net, coreset_seed, n_images), broadcast=True, hash=False)
    shards = []
    try:
        shards = [
            client.submit(_extract_shard, job, part, reader, int(offset), pure=False)
            for part, offset in zip(_parts(X, sizes, client), offsets)
        ]
        summaries = client.gather([client.submit(_Shard.summary, shard, pure=False) for shard in shards])
        image_shape, feature_shape, size = _common_shapes(summaries)
        h, w, dim = feature_shape
        detector._log(
            f"{n_shards} shards extracted and subsampled on "
            f"{len({s['worker'] for s in summaries})} workers (slowest: extraction "
            f"{max(s['extract_s'] for s in summaries):.1f} s, coreset "
            f"{max(s['coreset_s'] for s in summaries):.1f} s)", start,
        )

        start = time.perf_counter()
        n_bank = coreset_size(detector.coreset_ratio, n_images * h * w)
        merged, union_radius = merge_coresets(
            [s["rows"] for s in summaries], n_bank, projection_dim=detector.projection_dim,
            random_state=coreset_seed, method=detector.coreset_method, device=device,
        )
        bank = np.concatenate([s["rows"] for s in summaries])[merged]
        coreset = np.concatenate([s["indices"] for s in summaries])[merged]
        shard_radius = max(s["radius"] for s in summaries)
        detector._log(
            f"union pass: {len(bank)} of {sum(len(s['rows']) for s in summaries)} "
            f"shard coreset rows; shard radius {shard_radius:.4g} + union radius "
            f"{union_radius:.4g} bound the covering radius (selection space)", start,
        )
        index = detector._build_index(bank, n_images * h * w, index_seed, device)

        start = time.perf_counter()
        held_out = detector._threshold_images(n_images, threshold_seed)
        [bank_data] = client.scatter([(bank, coreset // (h * w))], broadcast=True, hash=False)
        futures = [
            client.submit(
                _shard_leave_one_out, shard, job, bank_data,
                held_out[(held_out >= offset) & (held_out < offset + size)], pure=False,
            )
            for shard, offset, size in zip(shards, offsets, sizes)
        ]
        results = client.gather(futures)
        bank_data.release()
        detector._log(f"leave-one-image-out thresholds of {len(held_out)} images", start)
    finally:
        for future in [job, *shards]:
            future.release()
    loo_scores = np.concatenate([scores for scores, _ in results])
    pixel_threshold = max(pixel_max for _, pixel_max in results)
    detector._set_fitted(
        net, index, coreset, held_out, loo_scores, pixel_threshold, image_shape,
        feature_shape, n_images,
    )
    return detector


def _shard_leave_one_out(shard, job, bank_data, held_out):
    bank, groups = bank_data
    if not len(held_out):
        return np.empty(0, dtype=np.float32), 0.0
    return shard.leave_one_out(job.detector, bank, groups, held_out)


def _common_shapes(summaries):
    """The shards' common image shape, patch grid and network input size."""
    for key, what in (("feature_shape", "patch grids"), ("size", "network input sizes")):
        found = {tuple(s[key]) for s in summaries}
        if len(found) > 1:
            raise ValueError(
                f"The shards' images give different {what} {sorted(found)}; set "
                "image_size=(height, width) so that all training images give one."
            )
    channels = {s["image_shape"][-1] for s in summaries}
    if len(channels) > 1:
        raise ValueError("Training images must all be grayscale or all RGB; got both.")
    first = summaries[0]
    return tuple(first["image_shape"]), tuple(first["feature_shape"]), tuple(first["size"])


# ---------------------------------------------------------------- sharded bank
def _fit_shard_index(bank, device):
    return NearestNeighborIndex(algorithm="exact", device=device).fit(bank)


def _shard_kneighbors(index, X, n_neighbors, offset, device):
    index.set_params(device=device)
    distances, indices = index.kneighbors(X, n_neighbors, exact=True)
    return distances, indices + offset


def _shard_rows(index, rows):
    return index.bank_[rows]


def _assemble_rows(n, dim, positions, *parts):
    out = np.empty((n, dim), dtype=np.float32)
    for where, rows in zip(positions, parts):
        out[where] = rows
    return out


def _shard_neighbors(index, query, n_neighbors, offset, device):
    distances, indices = _shard_kneighbors(index, query, n_neighbors, 0, device)
    return distances, indices + offset, index.bank_[indices]


def _merge_nearest(parts, n_neighbors):
    """The ``n_neighbors`` nearest of the shards' candidates, nearest first.

    Shards come in bank order and the sort is stable, so among equal
    distances the lower bank row wins, as in one search of the whole bank.
    """
    distances = np.concatenate([part[0] for part in parts], axis=1)
    order = np.argsort(distances, axis=1, kind="stable")[:, :n_neighbors]
    return [
        np.take_along_axis(np.concatenate([part[i] for part in parts], axis=1),
                           order.reshape(order.shape + (1,) * (parts[0][i].ndim - 2)), axis=1)
        for i in range(len(parts[0]))
    ]


class ShardedIndex(BaseEstimator):
    """Exact nearest-neighbour search in a memory bank split over Dask workers.

    Each shard of the bank lives on one worker, in an exact
    :class:`~skpatchcore.NearestNeighborIndex`. A batch of queries is sent to
    every worker once; each answers with its own nearest rows, and a query's
    nearest distance is the minimum over the shards: one round trip per
    batch. Results equal one exact search of the whole bank (the same
    float32 arithmetic row by row; shards are merged in bank order, so ties
    go to the lower row as well).

    The Eq. 7 support of :meth:`bank_neighbors` (the bank rows nearest to
    ``m*``) comes from **all** shards: ``m*``'s row travels from its shard to
    the others inside the cluster, each returns its nearest rows and the
    nearest overall are kept. The support from ``m*``'s shard alone would
    miss neighbours on other shards, and change scores. It is a second round
    trip per batch, of one query per image.

    Parameters
    ----------
    n_shards : int, default=None
        Shards of the bank, spread over the workers in turn; ``None``: one
        per worker. For a dask array bank, its row chunks re-chunked into
        this many.
    device : str or torch.device, default="cpu"
        Torch device of the search on the workers.

    Attributes
    ----------
    shards_ : list of distributed.Future
        Each shard's fitted index, held by its worker.
    offsets_ : ndarray of shape (n_shards + 1,)
        First bank row of each shard, then the bank's length.
    n_samples_fit_ : int
        Rows of the bank.
    n_features_in_ : int
        Features of the bank.
    algorithm_ : str
        ``"exact"``.

    See Also
    --------
    shard_memory_bank : A fitted detector that searches a sharded bank.
    skpatchcore.NearestNeighborIndex : The index of one shard.

    Notes
    -----
    A ``ShardedIndex`` refers to data held by a running cluster, so it does not
    pickle; save the detector whose bank it holds instead.

    Examples
    --------
    >>> from skpatchcore.distributed import ShardedIndex
    >>> index = ShardedIndex(n_shards=4).fit(bank)  # doctest: +SKIP
    >>> distances, rows = index.kneighbors(patches)  # doctest: +SKIP
    """

    _parameter_constraints: dict = {
        "n_shards": [Interval(Integral, 1, None, closed="left"), None],
        "device": [str, torch.device],
    }

    def __init__(self, *, n_shards=None, device="cpu"):
        self.n_shards = n_shards
        self.device = device

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, bank, y=None, *, client=None):
        """Split the bank over the workers and index each shard there.

        Parameters
        ----------
        bank : array-like of shape (n_bank, n_features), or dask array
            The memory bank. A NumPy array (or memory map) is sent shard by
            shard; a dask array's shards are computed on the workers and
            never pass through the client.
        y : Ignored
            Not used, present for API consistency by convention.
        client : distributed.Client, default=None
            ``None`` uses the default client.

        Returns
        -------
        self : ShardedIndex
        """
        client = _get_client(client)
        device = str(check_device(self.device))
        n_shards = self.n_shards or _n_workers(client)
        if _is_dask_array(bank):
            if bank.ndim != 2:
                raise ValueError(f"bank must be 2-D (n_bank, n_features); got shape {bank.shape}.")
            n_bank, n_features = bank.shape
            sizes = [len(s) for s in np.array_split(np.arange(n_bank), min(n_shards, n_bank))]
            blocks = _parts(bank.astype(np.float32), sizes, client)
        else:
            bank = check_array(bank, dtype=np.float32, input_name="bank")
            n_bank, n_features = bank.shape
            pieces = np.array_split(bank, min(n_shards, n_bank))
            sizes = [len(piece) for piece in pieces]
            workers = list(client.scheduler_info(n_workers=-1)["workers"])
            blocks = [
                client.scatter(piece, workers=[worker], hash=False)
                for piece, worker in zip(pieces, cycle(workers))
            ]
        shards = [client.submit(_fit_shard_index, block, device, pure=False) for block in blocks]
        distributed.wait(shards)
        for shard in shards:
            if shard.status == "error":
                shard.result()  # raises the worker's error here
        self.shards_ = shards
        self.offsets_ = np.cumsum([0, *sizes])
        self.n_samples_fit_, self.n_features_in_ = int(n_bank), int(n_features)
        self.algorithm_ = "exact"
        return self

    def _checked(self, X) -> np.ndarray:
        check_is_fitted(self)
        if isinstance(X, torch.Tensor):
            X = X.detach().cpu().numpy()
        X = check_array(X, dtype=np.float32, order="C")
        if X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {X.shape[1]} features, but the bank has {self.n_features_in_} features."
            )
        return X

    @property
    def _client(self):
        return self.shards_[0].client

    def kneighbors(self, X, n_neighbors: int = 1, *, exact: bool = True):
        """Nearest bank rows of each query, over all shards.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features_in_)
        n_neighbors : int, default=1
            At most ``n_samples_fit_``.
        exact : bool, default=True
            Always exact; accepted for the interface of
            :class:`~skpatchcore.NearestNeighborIndex`.

        Returns
        -------
        distances : ndarray of shape (n_queries, n_neighbors), float32
        indices : ndarray of shape (n_queries, n_neighbors), int64
            Rows of the whole bank.
        """
        X = self._checked(X)
        if not isinstance(n_neighbors, Integral) or not 1 <= n_neighbors <= self.n_samples_fit_:
            raise ValueError(
                f"n_neighbors must be an int in [1, {self.n_samples_fit_}]; got {n_neighbors!r}."
            )
        client, device = self._client, str(check_device(self.device))
        queries = client.scatter(X, broadcast=True, hash=False)
        try:
            parts = client.gather([
                client.submit(_shard_kneighbors, shard, queries, min(n_neighbors, stop - start),
                              int(start), device, pure=False)
                for shard, start, stop in zip(self.shards_, self.offsets_, self.offsets_[1:])
            ])
        finally:
            queries.release()
        return tuple(_merge_nearest(parts, n_neighbors))

    def largest_nearest(self, X, *, grid=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The query of each group farthest from its nearest bank row (Eq. 6), exactly.

        Every query is searched on every shard (one round trip): the pruning
        of :meth:`NearestNeighborIndex.largest_nearest
        <skpatchcore.NearestNeighborIndex.largest_nearest>` needs the cells
        of one whole bank, which a split bank does not offer.

        Parameters
        ----------
        X : ndarray of shape (n_groups, n_queries, n_features_in_), float32
            Queries in groups, e.g. the patch features of images.
        grid : (h, w), default=None
            Ignored (every query is searched); accepted as by
            :meth:`NearestNeighborIndex.largest_nearest
            <skpatchcore.NearestNeighborIndex.largest_nearest>`.

        Returns
        -------
        distances : ndarray of shape (n_groups,), float32
        positions : ndarray of shape (n_groups,), int64
            Position of that query in its group (the first one on ties).
        indices : ndarray of shape (n_groups,), int64
            Its nearest bank row.
        """
        X = np.asarray(X, dtype=np.float32)
        n_groups, n_queries, _ = X.shape
        distances, indices = self.kneighbors(X.reshape(n_groups * n_queries, -1), 1)
        return max_patches(distances.reshape(n_groups, n_queries), indices.reshape(n_groups, n_queries))

    def bank_neighbors(self, indices, n_neighbors: int):
        """The bank rows nearest to given bank rows, from all shards (Eq. 7's support).

        Parameters
        ----------
        indices : array-like of shape (n_queries,), int
            Rows of the whole bank.
        n_neighbors : int
            Neighbours per row, the row itself included.

        Returns
        -------
        neighbors : ndarray of shape (n_queries, n_neighbors), int64
        rows : ndarray of shape (n_queries, n_neighbors, n_features_in_), float32
        """
        check_is_fitted(self)
        indices = np.asarray(indices, dtype=np.int64)
        client, device = self._client, str(check_device(self.device))
        owner = np.searchsorted(self.offsets_, indices, side="right") - 1
        positions, row_parts = [], []
        for s in np.unique(owner):
            where = np.flatnonzero(owner == s)
            positions.append(where)
            row_parts.append(client.submit(
                _shard_rows, self.shards_[s], indices[where] - self.offsets_[s], pure=False
            ))
        # m*'s rows are assembled on the cluster and go from worker to worker.
        query = client.submit(
            _assemble_rows, len(indices), self.n_features_in_, positions, *row_parts, pure=False
        )
        parts = client.gather([
            client.submit(_shard_neighbors, shard, query, min(n_neighbors, stop - start),
                          int(start), device, pure=False)
            for shard, start, stop in zip(self.shards_, self.offsets_, self.offsets_[1:])
        ])
        _, neighbors, rows = _merge_nearest(parts, n_neighbors)
        return neighbors, rows

    def __getstate__(self):
        raise TypeError(
            "A ShardedIndex refers to data held by a running Dask cluster and does not "
            "pickle; save the detector whose memory bank it holds instead."
        )


@validate_params(
    {
        "detector": [PatchCoreDetector],
        "n_shards": [Interval(Integral, 1, None, closed="left"), None],
        "client": [None, distributed.Client],
    },
    prefer_skip_nested_validation=True,
)
def shard_memory_bank(
    detector: PatchCoreDetector, *, n_shards: int | None = None, client: distributed.Client | None = None
) -> PatchCoreDetector:
    """A copy of a fitted detector that searches its memory bank split over the workers.

    The copy's ``nn_index_`` is a :class:`ShardedIndex` of the detector's
    bank and it holds no ``memory_bank_`` of its own (the original keeps
    its). Its network runs where it is called; the nearest-neighbour search
    and the Eq. 7 support run on the cluster. Scores and maps equal the
    detector's (exact search, compared bit for bit in the tests).

    Parameters
    ----------
    detector : PatchCoreDetector
        Fitted.
    n_shards : int, default=None
        See :class:`ShardedIndex`.
    client : distributed.Client, default=None
        ``None`` uses the default client.

    Returns
    -------
    sharded : PatchCoreDetector
        Scores like ``detector``; does not pickle (its index lives on the
        cluster).

    Examples
    --------
    >>> from skpatchcore.distributed import shard_memory_bank
    >>> sharded = shard_memory_bank(detector, n_shards=4)  # doctest: +SKIP
    >>> sharded.score_samples(images)  # doctest: +SKIP
    """
    check_is_fitted(detector)
    index = ShardedIndex(n_shards=n_shards, device=detector.device).fit(detector.memory_bank_, client=client)
    sharded = clone(detector)
    state = {key: value for key, value in vars(detector).items() if key.endswith("_")}
    state.pop("memory_bank_")
    vars(sharded).update(state, nn_index_=index)
    return sharded


# ------------------------------------------------------------------- threads
class TorchThreads(distributed.WorkerPlugin):
    """Set torch's CPU threads on every Dask worker, those that join later included.

    A worker runs up to ``nthreads`` tasks at once, and each task's torch
    operations use torch's own thread pool; on a machine whose cores the
    workers share, the product oversubscribes the cores and every task slows
    down. Dask's nanny starts workers with ``OMP_NUM_THREADS=1``; this plugin
    makes the choice explicit (a worker without a nanny, or inside the
    client's process, would take every core), and lets a worker that has a
    machine to itself give its cores to one task at a time.

    Torch's setting is per thread (OpenMP's), so the plugin sets it on each
    of the worker's task threads, by running one short job on each at once,
    as well as for the threads started later. Register it while the workers
    are idle: a thread busy with a task for more than a minute keeps its
    setting (and the plugin logs a warning).

    Parameters
    ----------
    n_threads : int, default=1
        Torch threads per task thread: ``cores / (workers * threads_per_worker)``
        on the machine, at least 1.

    Examples
    --------
    >>> from skpatchcore.distributed import TorchThreads
    >>> client.register_plugin(TorchThreads(1))  # doctest: +SKIP
    """

    name = "skpatchcore-torch-threads"

    def __init__(self, n_threads: int = 1):
        if not isinstance(n_threads, Integral) or n_threads < 1:
            raise ValueError(f"n_threads must be a positive int; got {n_threads!r}.")
        self.n_threads = int(n_threads)

    async def setup(self, worker):
        torch.set_num_threads(self.n_threads)  # threads that start from now on
        n = worker.state.nthreads
        barrier = threading.Barrier(n)

        def apply():
            torch.set_num_threads(self.n_threads)
            barrier.wait(timeout=_THREAD_SETUP_S)  # holds each thread until all have run one

        jobs = [asyncio.wrap_future(worker.executors["default"].submit(apply)) for _ in range(n)]
        failed = [r for r in await asyncio.gather(*jobs, return_exceptions=True) if r is not None]
        if failed:
            logging.getLogger("skpatchcore").warning(
                "TorchThreads: some task threads of worker %s were busy and keep their torch "
                "thread count (%s)", worker.address, failed[0],
            )
