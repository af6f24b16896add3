"""Nearest-neighbour search of patch features in the memory bank (paper Sec. 3.3)."""

from __future__ import annotations

import itertools
import threading
import warnings
from numbers import Integral, Real

import numpy as np
import torch
from joblib import effective_n_jobs
from sklearn import get_config
from sklearn.base import BaseEstimator, _fit_context
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_array, check_random_state
from sklearn.utils._chunking import get_chunk_n_rows
from sklearn.utils._param_validation import Interval, StrOptions, validate_params
from sklearn.utils.validation import check_is_fitted, validate_data
from threadpoolctl import ThreadpoolController

from ._device import check_device
from ._memory import batches

__all__ = ["NearestNeighborIndex", "exact_kneighbors", "pynndescent_pays_off"]

# Cost model of ``algorithm="auto"``, from figures measured on a 2-core AMD EPYC
# (AVX2, MKL torch), one image's 1024 query patches, banks of real EfficientNet-Lite0
# features of MVTec "bottle":
#   bank rows          250    500   1000   2000   5000  10000
#   d=152 exact ms     2.7    4.8    7.1   12.7   29.8   80.4
#   d=152 pynnd. ms    7.5    7.0    6.7    7.2    7.5    9.6
#   d=432 exact ms     5.5    9.8   19.2   39.0   82.6     -
# Exact search costs about 5e-11 s per query, bank row and dimension on 2 torch
# threads (float32 GEMM at ~40 GFLOP/s plus the selection); a pynndescent query
# about 7e-6 s whatever the bank (21,400 x 152 and x 384 banks, single thread).
# Building a pynndescent index costs about a minute of numba compilation in every
# process (50-90 s here; its construction code is not cached on disk), then
# about 1e-6 s per bank row and dimension (2-5 s for 21,400 x 152).
_EXACT_S_PER_ROW_DIM_THREAD = 1e-10
_PYNNDESCENT_QUERY_S = 7e-6
_PYNNDESCENT_COMPILE_S = 60.0
_PYNNDESCENT_BUILD_S_PER_ROW_DIM = 1e-6


def pynndescent_pays_off(
    n_samples: int, n_features: int, n_queries: int, *, n_threads: int, device
) -> bool:
    """Whether a pynndescent index saves more search time than it costs to build.

    The cost model of ``algorithm="auto"``: building the graph costs a fixed
    numba compilation plus time linear in the bank; each query then saves the
    difference between an exact search (linear in the bank, spread over
    ``n_threads``) and a graph search (about constant). On a GPU exact search
    is always used.

    Parameters
    ----------
    n_samples, n_features : int
        Shape of the bank.
    n_queries : int
        Queries expected over the index's life.
    n_threads : int
        Threads of the exact search (torch's).
    device : torch.device
        Device of the exact search.

    Returns
    -------
    bool
    """
    if torch.device(device).type != "cpu":
        return False
    exact_s = _EXACT_S_PER_ROW_DIM_THREAD * n_samples * n_features / max(1, n_threads)
    build_s = _PYNNDESCENT_COMPILE_S + _PYNNDESCENT_BUILD_S_PER_ROW_DIM * n_samples * n_features
    return n_queries * (exact_s - _PYNNDESCENT_QUERY_S) > build_s

# One lock for all pynndescent queries (a lock per index would not pickle):
# queries from several threads take turns, each on its own numba threads.
_PYNNDESCENT_QUERY_LOCK = threading.Lock()


# Below this many queries a chunk's product is computed as bank @ X.T: CPU GEMM
# kernels handle a tall, narrow output far better than a short, wide one
# (4 queries against a 21402 x 384 bank: 3.1 ms instead of 7.3 ms, one thread).
_FEW_QUERIES = 32

# Smallest budget in MiB of one chunk of exact distances when none is set: 512
# queries against a 16,384-row bank, enough rows for the products to run at speed.
_MIN_CHUNK_MIB = 32

# Principal axes of the bank kept for the lower bounds of nearest_within. On the
# top-4 patches of each MVTec bottle test image against 21402-row coreset banks,
# with bounds 1 % above the true distance, 64 axes left a median of 0.7 % of the
# bank to check exactly (p90 2.4 %) for 152-dim Lite0 features, ~0 % (p90 0.2 %)
# for 384-dim ResNet-18 ones; 32 axes left 3.1 % (p90 11.7 %) of the Lite0 bank.
_BOUND_AXES = 64

# largest_nearest: queries per group searched exactly for the floor of the
# group's maximum, and cells of the bank each query searches for its upper bound.
# On the 83 MVTec bottle test images against a 10240-row Lite0 bank, 2 cells
# (of about 140) left 1-7 queries per image to search in full; 1 cell left a
# floor below the maximum on a fifth of the images, and hundreds of queries.
_FLOOR_QUERIES = 4
_FIRST_CELLS = (0, 2)
# Then the 3rd to 8th nearest cells of the queries not yet ruled out.
_MORE_CELLS = (2, 8)
# ... when their full search would cost more row products than this (below, the
# per-cell overhead of a few queries costs more than searching them in full).
_MORE_CELLS_MIN_WORK = 1 << 21
_ONE_BLAS_THREAD = ThreadpoolController()
# Cell centres: Lloyd iterations from random rows, on at most this many rows per
# cell (more iterations hardly changed the cells of Lite0 banks).
_CELL_KMEANS_ITER = 5
_CELL_KMEANS_ROWS = 64
# Banks of at most this many rows are searched in full by ``largest_nearest``: the
# cells' per-cell products cost more than one product with the whole bank. With
# 4 images of 1024 Lite0 patches: 54 rows 9.8 ms by cells vs 1.4 ms in full,
# 270 rows 12.3 vs 4.7 ms, 1075 rows 12.3 vs 18.7 ms.
_FULL_SEARCH_MAX_ROWS = 512
# Banks up to this size keep a second, cell-ordered copy (``cell_blocks_``);
# larger ones gather each cell's rows at every search instead.
_CELL_BLOCKS_MAX_BYTES = 256 * 2**20


def _as_tensor(A, name: str, device: torch.device) -> torch.Tensor:
    """2-D, finite, non-empty float32 tensor on ``device`` (no copy when already there)."""
    if isinstance(A, torch.Tensor):
        A = A.detach()
        if A.ndim != 2 or A.shape[0] == 0 or A.shape[1] == 0:
            raise ValueError(
                f"{name} must be a non-empty 2-D array (n_samples, n_features); "
                f"got shape {tuple(A.shape)}."
            )
        A = A.to(device=device, dtype=torch.float32)
        if not torch.isfinite(A).all():
            raise ValueError(f"Input {name} contains NaN or infinity.")
        return A
    return torch.from_numpy(check_array(A, dtype=np.float32, input_name=name)).to(device)


def _squared_norms(A: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,ij->i", A, A)


def _check_n_neighbors(n_neighbors, n_bank: int) -> None:
    if n_neighbors > n_bank:
        raise ValueError(
            f"n_neighbors={n_neighbors} is larger than the {n_bank} bank samples to search."
        )


@validate_params(
    {
        "X": ["array-like"],
        "bank": ["array-like"],
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "bank_sq_norms": ["array-like", None],
        "query_groups": ["array-like", None],
        "bank_groups": ["array-like", None],
        "working_memory": [Interval(Real, 0, None, closed="neither"), None],
        "device": [str, torch.device],
    },
    prefer_skip_nested_validation=True,
)
def exact_kneighbors(
    X,
    bank,
    n_neighbors: int = 1,
    *,
    bank_sq_norms=None,
    query_groups=None,
    bank_groups=None,
    working_memory: float | None = None,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact Euclidean k-nearest neighbours of ``X`` in ``bank``.

    Squared distances are ``||x||² - 2 x·b + ||b||²`` from float32 matrix
    products in torch, computed for chunks of queries so that one chunk's
    ``(n_chunk, n_bank)`` distance block fits in ``working_memory``.

    Parameters
    ----------
    X : array-like or torch.Tensor of shape (n_queries, n_features)
        Query points, converted to float32.
    bank : array-like or torch.Tensor of shape (n_bank, n_features)
        Points searched, converted to float32.
    n_neighbors : int, default=1
        Neighbours returned per query, at most ``n_bank`` (minus the entries
        excluded by the groups).
    bank_sq_norms : array-like or torch.Tensor of shape (n_bank,), default=None
        Precomputed ``||b||²`` of the bank rows, to save recomputing them on
        every call; computed when None.
    query_groups : array-like of shape (n_queries,), default=None
        Integer group of each query, e.g. the training image it comes from.
        Given together with ``bank_groups``.
    bank_groups : array-like of shape (n_bank,), default=None
        Integer group of each bank row. A query never matches a bank row of
        its own group (leave-one-image-out scores of training images).
    working_memory : float, default=None
        Memory budget in MiB for one chunk of distances; None takes as much
        as the bank's own size (at least 32 MiB), within
        ``sklearn.get_config()["working_memory"]``.
    device : str or torch.device, default="cpu"
        Torch device of the computation, e.g. ``"cuda"``.

    Returns
    -------
    distances : ndarray of shape (n_queries, n_neighbors), float32
        Euclidean distances, ascending along each row.
    indices : ndarray of shape (n_queries, n_neighbors), int64
        Rows of ``bank`` at those distances.

    Raises
    ------
    ValueError
        If the inputs are not finite 2-D arrays with the same number of
        features, if fewer than ``n_neighbors`` bank rows are left to a query,
        or if CUDA is asked for but unavailable.

    See Also
    --------
    NearestNeighborIndex : Exact or approximate search in a fixed bank.

    Notes
    -----
    The expansion loses precision against direct differences when points lie
    close together relative to their norms: squared distances are off by up to
    about ``1e-7 * (||x||² + ||b||²)``, so the distance of a duplicate may read
    up to about ``5e-4 * ||x||`` instead of 0, and a slightly negative squared
    distance is clipped to zero. On PatchCore features (norms about 60) this
    is below 0.3 % of the nearest-neighbour distances.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore.neighbors import exact_kneighbors
    >>> bank = np.array([[0.0, 0.0], [3.0, 4.0]], dtype=np.float32)
    >>> dist, idx = exact_kneighbors(np.array([[3.0, 3.0]]), bank, 2)
    >>> dist.round(3), idx
    (array([[1.   , 4.243]], dtype=float32), array([[1, 0]]))
    >>> exact_kneighbors(np.array([[3.0, 3.0]]), bank, query_groups=[0], bank_groups=[1, 0])
    (array([[4.2426405]], dtype=float32), array([[0]]))
    """
    device = check_device(device)
    X = _as_tensor(X, "X", device)
    bank = _as_tensor(bank, "bank", device)
    n_queries, n_bank = X.shape[0], bank.shape[0]
    if X.shape[1] != bank.shape[1]:
        raise ValueError(
            f"X has {X.shape[1]} features, but the bank has {bank.shape[1]} features."
        )
    _check_n_neighbors(n_neighbors, n_bank)

    if bank_sq_norms is None:
        bank_sq_norms = _squared_norms(bank)
    else:
        bank_sq_norms = torch.as_tensor(bank_sq_norms, dtype=torch.float32, device=device)
        if bank_sq_norms.shape != (n_bank,):
            raise ValueError(
                f"bank_sq_norms must have shape ({n_bank},); got {tuple(bank_sq_norms.shape)}."
            )

    if (query_groups is None) != (bank_groups is None):
        raise ValueError("query_groups and bank_groups must be given together.")
    if query_groups is not None:
        query_groups, bank_groups = _check_groups(
            query_groups, bank_groups, n_queries, n_bank, n_neighbors
        )
        query_groups = torch.from_numpy(query_groups).to(device)
        bank_groups = torch.from_numpy(bank_groups).to(device)
    return _search(X, bank, bank_sq_norms, n_neighbors, query_groups, bank_groups, working_memory)


def _working_memory(working_memory: float | None, bank_bytes: int) -> float:
    """The MiB budget of a chunk of work buffers: as given, or as much as the bank."""
    if working_memory is not None:
        return working_memory
    # Work buffers scale with the data: a chunk takes no more room than the
    # bank itself (but enough rows for efficient matrix products).
    return min(get_config()["working_memory"], max(_MIN_CHUNK_MIB, bank_bytes / 2**20))


def _search(X, bank, bank_sq_norms, n_neighbors, query_groups, bank_groups, working_memory):
    """:func:`exact_kneighbors` on validated tensors of one device."""
    n_queries, n_bank = X.shape[0], bank.shape[0]
    working_memory = _working_memory(working_memory, n_bank * bank.shape[1] * bank.element_size())
    # One float32 distance per bank row, plus as much again for the group mask
    # and the selection's workspace.
    if 8 * n_bank * n_queries <= working_memory * 2**20:
        chunk_n_rows = n_queries  # spares get_chunk_n_rows' validation on small calls
    else:
        chunk_n_rows = get_chunk_n_rows(
            row_bytes=8 * n_bank, max_n_rows=n_queries, working_memory=working_memory
        )
    distances = torch.empty((n_queries, n_neighbors), dtype=torch.float32, device=X.device)
    indices = torch.empty((n_queries, n_neighbors), dtype=torch.int64, device=X.device)
    with torch.no_grad():
        for rows in batches(n_queries, chunk_n_rows):
            # ||b||² - 2 x·b ranks the bank like the full distance: ||x||² is
            # constant along the row, so it is added to the k winners only.
            if rows.stop - rows.start < _FEW_QUERIES:
                block = torch.addmm(bank_sq_norms[:, None], bank, X[rows].T, alpha=-2.0).T
            else:
                block = torch.addmm(bank_sq_norms, X[rows], bank.T, alpha=-2.0)
            if query_groups is not None:
                same = query_groups[rows, None] == bank_groups[None, :]
                block.masked_fill_(same, torch.inf)
            if n_neighbors == 1:  # a plain reduction, cheaper than a selection
                nearest = _argmin_rows(block)
                values, indices[rows] = block.gather(1, nearest), nearest
            else:
                values, indices[rows] = torch.topk(block, n_neighbors, dim=1, largest=False)
            distances[rows] = values + _squared_norms(X[rows])[:, None]
        distances = distances.clamp_(min=0.0).sqrt_()
    return distances.cpu().numpy(), indices.cpu().numpy()


def _argmin_rows(block: torch.Tensor) -> torch.Tensor:
    """Position of each row's smallest value (the first on ties), ``(n_rows, 1)``."""
    if block.device.type == "cpu":
        # numpy's vectorised argmin: 0.9 ms on a 372 x 10240 block, where torch's
        # min(dim=1) and argmin took 4.3-4.9 ms (2 threads).
        return torch.from_numpy(block.numpy().argmin(axis=1)[:, None])
    return block.argmin(dim=1, keepdim=True)


def _bank_cells(bank: np.ndarray, bank_sq_norms: np.ndarray, working_memory, random_state) -> tuple:
    """Rows of ``bank`` grouped into cells around some of its rows: ``(centre_rows, order, bounds)``.

    About ``sqrt(2 * n)`` centres balance a query's two costs: its distances to
    every centre, and to every row of its nearest cells (``n / n_cells`` each).
    The centres are the rows nearest to k-means centres, which sit where the
    rows are dense, so the cells hold similar numbers of rows, and a query's
    nearest cells usually hold its nearest row. (A coreset bank's first greedy
    picks, the centres before, are its outliers: on MVTec screw at 512 px most
    queries fell into a few large cells, 754 rows per query against 214.)
    Being rows, the centres also bound every query's nearest distance from
    above at the cost of the distances to them. The k-means centres are fitted
    on at most ``_CELL_KMEANS_ROWS`` rows per cell, then every row joins its
    nearest centre row.
    """
    n_cells = max(1, min(len(bank), round(np.sqrt(2 * len(bank)))))
    rng = check_random_state(random_state)
    sample = bank
    if len(bank) > _CELL_KMEANS_ROWS * n_cells:
        sample = bank[np.sort(rng.choice(len(bank), _CELL_KMEANS_ROWS * n_cells, replace=False))]
    with warnings.catch_warnings():
        # Duplicate rows can leave fewer distinct centres; empty cells are dropped below.
        warnings.simplefilter("ignore", ConvergenceWarning)
        kmeans = KMeans(
            n_cells, init="random", n_init=1, max_iter=_CELL_KMEANS_ITER, random_state=rng
        ).fit(sample)
    rows, rows_sq = torch.from_numpy(bank), torch.from_numpy(bank_sq_norms)
    means = torch.from_numpy(kmeans.cluster_centers_.astype(np.float32))
    centre_rows = np.unique(_search(means, rows, rows_sq, 1, None, None, working_memory)[1][:, 0])
    picked = torch.from_numpy(centre_rows)
    cell = _search(rows, rows[picked], rows_sq[picked], 1, None, None, working_memory)[1][:, 0]
    used = np.flatnonzero(np.bincount(cell, minlength=len(centre_rows)))
    cell = np.searchsorted(used, cell)
    bounds = np.zeros(len(used) + 1, dtype=np.int64)
    np.cumsum(np.bincount(cell, minlength=len(used)), out=bounds[1:])
    return centre_rows[used], np.argsort(cell, kind="stable"), bounds


def _group_maxima(group, query, dist, idx, n_queries):
    """Per group, the candidate query of largest distance (the first one on ties)."""
    best = np.lexsort((query, -dist, group[query]))
    owner = group[query[best]]
    first = best[np.r_[True, owner[1:] != owner[:-1]]]
    return dist[first], query[first] - n_queries * group[query[first]], idx[first]


def _principal_projection(bank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Leading principal axes of ``bank`` ``(n_features, r)`` and the bank on them."""
    mean = bank.mean(axis=0, dtype=np.float64).astype(np.float32)
    centred = torch.from_numpy(bank - mean)
    # eigh of the Gram matrix (largest variance last), in float64 so that the axes
    # are orthonormal: projected distances must not exceed the full ones.
    _, vectors = torch.linalg.eigh((centred.T @ centred).double())
    axes = vectors[:, -_BOUND_AXES:].flip(1).float().contiguous()
    return axes.numpy(), (torch.from_numpy(bank) @ axes).numpy()


def _check_groups(query_groups, bank_groups, n_queries, n_bank, n_neighbors):
    """Integer 1-D group labels, with ``n_neighbors`` bank rows left to every query."""
    query_groups = _check_group_labels(query_groups, "query_groups", n_queries)
    bank_groups = _check_group_labels(bank_groups, "bank_groups", n_bank)
    labels, counts = np.unique(bank_groups, return_counts=True)
    pos = np.clip(np.searchsorted(labels, query_groups), 0, len(labels) - 1)
    excluded = np.where(labels[pos] == query_groups, counts[pos], 0)
    if n_bank - excluded.max() < n_neighbors:
        raise ValueError(
            f"n_neighbors={n_neighbors} but only {n_bank - excluded.max()} bank samples lie "
            "outside the group of some query."
        )
    return query_groups, bank_groups


def _check_group_labels(groups, name: str, n_samples: int) -> np.ndarray:
    groups = np.asarray(groups)
    if groups.shape != (n_samples,) or not np.issubdtype(groups.dtype, np.integer):
        raise ValueError(
            f"{name} must be an integer array of shape ({n_samples},); "
            f"got {groups.dtype} array of shape {groups.shape}."
        )
    return groups.astype(np.int64, copy=False)


class NearestNeighborIndex(BaseEstimator):
    """Euclidean k-nearest-neighbour search in a fixed memory bank.

    Exact search (chunked matrix products in torch, see
    :func:`exact_kneighbors`) or an approximate pynndescent graph index, built
    once in :meth:`fit` and persisted with the estimator.

    Parameters
    ----------
    algorithm : {"auto", "exact", "pynndescent"}, default="auto"
        Search backend. ``"auto"`` builds a pynndescent index only where
        the search time it saves over ``expected_n_queries`` queries pays for
        building it (:func:`pynndescent_pays_off`); see Notes.
    expected_n_queries : int or None, default=None
        Queries the index is expected to answer over its life, for
        ``algorithm="auto"``; None means as many as the bank has rows.
    n_trees : int, default=None
        Random-projection trees initialising the pynndescent graph; None lets
        pynndescent choose (3 to 12, growing with the bank size).
    n_graph_neighbors : int, default=30
        Degree of pynndescent's k-NN graph. Larger builds slower and searches
        more accurately.
    search_tree_leaf_size : int, default=10
        Most bank rows in a leaf of pynndescent's search tree (pynndescent's
        default: 30). Each query first measures its distance to every row of
        ``search_tree_leaf_budget`` leaves: small leaves make that start cheap.
    search_tree_leaf_budget : int, default=4
        Leaves of the search tree from which each query starts its graph
        search. More leaves avoid queries that start in the wrong part of the
        graph and never leave it (with pynndescent's default, 1, 1-2 % of patch
        queries end at twice their true distance); each extra leaf adds a
        little time per query.
    epsilon : float, default=0.2
        pynndescent search slack: larger searches more of the graph, more
        accurately and more slowly.
    working_memory : float, default=None
        Memory budget in MiB for a chunk of exact distances; None takes as
        much as the bank's own size (at least 32 MiB), within
        ``sklearn.get_config()["working_memory"]``.
    random_state : int, RandomState instance or None, default=None
        Seeds the pynndescent index construction.
    n_jobs : int, default=None
        Threads building and querying the pynndescent index. None means 1
        unless in a ``joblib.parallel_config`` context, -1 means all
        processors. Whether queries run in parallel is fixed when the index is
        built; their thread count is read at each query. The exact search uses
        torch's threads.
    device : str or torch.device, default="cpu"
        Torch device of the exact search.

    Attributes
    ----------
    bank_ : ndarray of shape (n_samples_fit_, n_features_in_), float32
        The memory bank, C-contiguous.
    bank_sq_norms_ : ndarray of shape (n_samples_fit_,), float32
        Squared Euclidean norms of the rows of ``bank_``.
    algorithm_ : {"exact", "pynndescent"}
        Backend in use.
    index_ : pynndescent.NNDescent or None
        The prepared graph index; None for the exact backend.
    principal_axes_ : ndarray of shape (n_features_in_, n_axes) or None
        Leading principal axes of the bank (at most 64), for the lower bounds
        of :meth:`nearest_within`; None for the exact backend.
    bank_projected_ : ndarray of shape (n_samples_fit_, n_axes) or None
        The bank on those axes.
    cell_centre_rows_ : ndarray of shape (n_cells,), int64
        Rows of the bank at the centres of the cells of :meth:`largest_nearest`:
        about ``sqrt(2 * n_samples_fit_)`` of them, each the row nearest to a
        k-means centre of the bank (a few Lloyd iterations from rows drawn
        with ``random_state``).
    cell_centres_ : ndarray of shape (n_cells, n_features_in_), float32
        ``bank_[cell_centre_rows_]``.
    cell_order_ : ndarray of shape (n_samples_fit_,), int64
        Rows of the bank grouped by cell: a row's cell is its nearest centre.
    cell_bounds_ : ndarray of shape (n_cells + 1,), int64
        Cell ``c`` holds ``cell_order_[cell_bounds_[c]:cell_bounds_[c + 1]]``.
    cell_blocks_ : ndarray, float32, or None
        One-dimensional, ``n_samples_fit_ * (n_features_in_ + 1)`` values:
        each cell's rows as ``[-2 b, ||b||²]`` (one column more than
        ``bank_``), transposed, the cells' blocks back to back: cell ``c`` is
        a contiguous ``(n_features_in_ + 1, size)`` block: the product of
        queries with its leading rows, plus its last row, gives
        ``||b||² - 2 x·b``, on the BLAS kernel that small products run
        fastest on (1.2 against 2.3 ms per Lite0 image at 256 px when the
        blocks were transposed views). A second copy of the bank, kept for
        banks up to 256 MiB (a fast :meth:`largest_nearest`); None for larger
        ones, whose cells are gathered at every search.
    n_features_in_ : int
        Number of features of the bank.
    n_samples_fit_ : int
        Number of rows of the bank.

    See Also
    --------
    exact_kneighbors : The exact search as a function, with group exclusion.
    sklearn.neighbors.NearestNeighbors : General-purpose exact search.

    Notes
    -----
    PatchCore scores a test patch by its distance to the nearest memory-bank
    entry (Roth et al., "Towards Total Recall in Industrial Anomaly
    Detection", CVPR 2022, Eq. 6).

    **Choosing a backend.** Exact search costs ``O(n_samples_fit_ *
    n_features_in_)`` per query in matrix products; pynndescent walks a
    k-NN graph and visits a few thousand bank rows per query whatever the
    bank size. On a 21402-row bank of real EfficientNet-Lite0 patch features
    of MVTec "bottle" (152 dims, 2-core CPU, 1024 queries per call), the
    defaults above reach recall@1 0.95 with a 0.5 % mean over-estimate of the
    distance, 0.6 % of patches over by more than 20 %, answering 12-20x
    faster than exact search (``benchmarks/neighbors.py``). pynndescent's own
    defaults (leaf size 30, one leaf, epsilon 0.1) were 20 % faster but at
    recall 0.86 (3.8 % mean over-estimate, 2.6 % of patches over 20 %); leaf
    size 30 with four leaves was as accurate as the defaults above and 30 %
    slower. It does not pay for small banks or few queries (see
    :func:`pynndescent_pays_off`), nor where anomaly maps must be exact.
    Raise ``epsilon`` or ``search_tree_leaf_budget`` for more accuracy;
    image scores need none: without maps they come from
    :meth:`largest_nearest`, exact with either backend, and with maps
    :func:`skpatchcore.scoring.image_scores` re-ranks the maximum exactly.

    **Costs of the pynndescent backend.** :meth:`fit` spends about a minute
    (50-75 s here) compiling pynndescent's graph construction with numba:
    this part is not cached on disk, so every process that fits pays it,
    whatever the bank size; the construction itself then takes 2-5 s for
    21400 x 152. The search code *is* cached on disk by numba (``cache=True``), and
    the index is prepared (search graph, tree, data order) in :meth:`fit`, so
    a pickled or ``joblib``-saved estimator is queried at once after loading:
    in a fresh process, importing pynndescent took 1.2-2 s, ``joblib.load``
    0.4-0.6 s and the first ``kneighbors`` of 1024 queries 27-41 ms (10-21 ms
    afterwards) for a 21400 x 152 bank. Only the first use of pynndescent on
    a machine, with an empty numba cache, compiles the search kernels: 40 s
    on import and 19 s in ``joblib.load`` here. The saved index holds a
    second, reordered copy of the bank, and the bank on its leading principal
    axes (``bank_projected_``). With ``n_jobs`` above 1, queries run on numba
    threads (parallel search kernels, also cached on disk); on 2 cores that
    scored a batch of 16 bottle images 1.7-2x faster. Querying mutates
    per-index search buffers, so pynndescent queries from several threads
    take turns (a lock); the exact search runs concurrently.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore import NearestNeighborIndex
    >>> bank = np.random.RandomState(0).rand(100, 8).astype(np.float32)
    >>> index = NearestNeighborIndex().fit(bank)
    >>> index.algorithm_
    'exact'
    >>> dist, idx = index.kneighbors(bank[:3], n_neighbors=2)
    >>> idx[:, 0]
    array([0, 1, 2])
    """

    # Indexes pickled before the blocks existed gather each cell at every search;
    # those pickled before the centres existed take the bank's first rows; those
    # pickled before the centres were rows (k-means centres) bound no query by them.
    cell_blocks_ = None
    cell_centres_ = None
    cell_centre_rows_ = None

    _parameter_constraints: dict = {
        "algorithm": [StrOptions({"auto", "exact", "pynndescent"})],
        "expected_n_queries": [Interval(Integral, 0, None, closed="left"), None],
        "n_trees": [Interval(Integral, 1, None, closed="left"), None],
        "n_graph_neighbors": [Interval(Integral, 2, None, closed="left")],
        "search_tree_leaf_size": [Interval(Integral, 1, None, closed="left")],
        "search_tree_leaf_budget": [Interval(Integral, 1, None, closed="left")],
        "epsilon": [Interval(Real, 0, None, closed="left")],
        "working_memory": [Interval(Real, 0, None, closed="neither"), None],
        "random_state": ["random_state"],
        "n_jobs": [Integral, None],
        "device": [str, torch.device],
    }

    def __init__(
        self,
        algorithm="auto",
        *,
        expected_n_queries=None,
        n_trees=None,
        n_graph_neighbors=30,
        search_tree_leaf_size=10,
        search_tree_leaf_budget=4,
        epsilon=0.2,
        working_memory=None,
        random_state=None,
        n_jobs=None,
        device="cpu",
    ):
        self.algorithm = algorithm
        self.expected_n_queries = expected_n_queries
        self.n_trees = n_trees
        self.n_graph_neighbors = n_graph_neighbors
        self.search_tree_leaf_size = search_tree_leaf_size
        self.search_tree_leaf_budget = search_tree_leaf_budget
        self.epsilon = epsilon
        self.working_memory = working_memory
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.device = device

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, bank, y=None):
        """Store the bank and, for the pynndescent backend, build its index.

        Parameters
        ----------
        bank : array-like or torch.Tensor of shape (n_samples, n_features)
            Memory bank, converted to float32.
        y : Ignored
            Not used, present for API consistency by convention.

        Returns
        -------
        self : NearestNeighborIndex
            Fitted index.
        """
        device = check_device(self.device)
        if isinstance(bank, torch.Tensor):
            bank = bank.detach().cpu().numpy()
        # A copy, so that later edits of the caller's array cannot desynchronise
        # bank_ from the norms and the graph built on it.
        self.bank_ = validate_data(self, bank, dtype=np.float32, order="C", copy=True)
        self.n_samples_fit_ = self.bank_.shape[0]
        self.bank_sq_norms_ = _squared_norms(torch.from_numpy(self.bank_)).numpy()
        if self.algorithm == "auto":
            n_queries = self.expected_n_queries
            pays = pynndescent_pays_off(
                *self.bank_.shape,
                self.n_samples_fit_ if n_queries is None else n_queries,
                n_threads=torch.get_num_threads(),
                device=device,
            )
            self.algorithm_ = "pynndescent" if pays else "exact"
        else:
            self.algorithm_ = self.algorithm
        self.index_ = self._build_pynndescent() if self.algorithm_ == "pynndescent" else None
        self.principal_axes_ = self.bank_projected_ = None
        if self.index_ is not None:
            self.principal_axes_, self.bank_projected_ = _principal_projection(self.bank_)
            self._bank_projected_sq_norms = _squared_norms(torch.from_numpy(self.bank_projected_))
        self.cell_centre_rows_, self.cell_order_, self.cell_bounds_ = _bank_cells(
            self.bank_, self.bank_sq_norms_, self.working_memory, self.random_state
        )
        self.cell_centres_ = self.bank_[self.cell_centre_rows_]
        self.cell_blocks_ = None
        if 4 * self.n_samples_fit_ * (self.n_features_in_ + 1) <= _CELL_BLOCKS_MAX_BYTES:
            width, bounds = self.n_features_in_ + 1, self.cell_bounds_.tolist()
            self.cell_blocks_ = np.empty(width * self.n_samples_fit_, dtype=np.float32)
            for start, stop in zip(bounds[:-1], bounds[1:]):  # each block written in place
                out = self.cell_blocks_[width * start : width * stop].reshape(width, -1)
                self._cell_block(self.cell_order_[start:stop], out=out)
        return self

    def _build_pynndescent(self):
        if self.n_samples_fit_ <= self.n_graph_neighbors:
            raise ValueError(
                f"algorithm='pynndescent' needs more bank samples than "
                f"n_graph_neighbors={self.n_graph_neighbors}; got {self.n_samples_fit_}. "
                "Use algorithm='exact' for so small a bank."
            )
        # Imported here: importing pynndescent costs seconds of numba set-up
        # that the exact backend should not pay.
        from pynndescent import NNDescent

        n_jobs = effective_n_jobs(self.n_jobs)
        index = NNDescent(
            self.bank_,
            metric="euclidean",
            n_neighbors=self.n_graph_neighbors,
            n_trees=self.n_trees,
            search_tree_leaf_size=self.search_tree_leaf_size,
            search_tree_leaf_budget=self.search_tree_leaf_budget,
            random_state=check_random_state(self.random_state),
            n_jobs=n_jobs,
            # Spreads the queries of one call over numba threads.
            parallel_batch_queries=n_jobs > 1,
            # Drops the construction-only k-NN graph: a smaller pickle.
            compressed=True,
        )
        # Builds the search graph and tree now rather than in the first query,
        # so that they are pickled with the estimator.
        index.prepare()
        return index

    def kneighbors(self, X, n_neighbors: int = 1, *, exact: bool = False):
        """Nearest bank rows of each query.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_queries, n_features_in_)
            Query points, converted to float32.
        n_neighbors : int, default=1
            Neighbours returned per query, at most ``n_samples_fit_``.
        exact : bool, default=False
            Search exactly even with the pynndescent backend.

        Returns
        -------
        distances : ndarray of shape (n_queries, n_neighbors), float32
            Euclidean distances, ascending along each row.
        indices : ndarray of shape (n_queries, n_neighbors), int64
            Rows of ``bank_`` at those distances.
        """
        check_is_fitted(self)
        if isinstance(X, torch.Tensor):
            X = X.detach().cpu().numpy()
        X = validate_data(self, X, reset=False, dtype=np.float32, order="C")
        if not isinstance(n_neighbors, Integral) or n_neighbors < 1:
            raise ValueError(f"n_neighbors must be a positive integer; got {n_neighbors!r}.")
        _check_n_neighbors(n_neighbors, self.n_samples_fit_)
        if exact or self.algorithm_ == "exact":
            return self._exact(X, n_neighbors)
        indices, distances = self._query(X, n_neighbors)
        indices = indices.astype(np.int64)
        distances = distances.astype(np.float32, copy=False)
        # Where the graph search found fewer than k neighbours, the missing ones
        # come back at an infinite distance (and an index of -1 or garbage).
        missed = ~np.isfinite(distances).all(axis=1) | (indices < 0).any(axis=1)
        if missed.any():
            distances[missed], indices[missed] = self._exact(X[missed], n_neighbors)
        return distances, indices

    def bank_neighbors(self, indices, n_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
        """The bank rows nearest to given bank rows, exactly: the support of Eq. 7.

        Parameters
        ----------
        indices : array-like of shape (n_queries,), int
            Rows of ``bank_`` (e.g. each image's ``m*``).
        n_neighbors : int
            Neighbours per row, the row itself included (it comes first
            unless it has an exact duplicate).

        Returns
        -------
        neighbors : ndarray of shape (n_queries, n_neighbors), int64
            Rows of ``bank_``, nearest first.
        rows : ndarray of shape (n_queries, n_neighbors, n_features_in_), float32
            ``bank_[neighbors]``.
        """
        check_is_fitted(self)
        _check_n_neighbors(n_neighbors, self.n_samples_fit_)
        # Bank rows need no validation: as kneighbors(exact=True), without its cost.
        neighbors = self._exact(self.bank_[np.asarray(indices)], n_neighbors)[1]
        return neighbors, self.bank_[neighbors]

    def _query(self, X, n_neighbors):
        """pynndescent's search, on ``n_jobs`` numba threads if built for parallel queries."""
        # pynndescent searches in buffers of the index (visited flags, heaps):
        # concurrent queries of one index would corrupt each other's.
        with _PYNNDESCENT_QUERY_LOCK:
            if not self.index_.parallel_batch_queries:
                return self.index_.query(X, k=n_neighbors, epsilon=self.epsilon)
            import numba

            previous = numba.get_num_threads()
            numba.set_num_threads(min(effective_n_jobs(self.n_jobs), numba.config.NUMBA_NUM_THREADS))
            try:
                return self.index_.query(X, k=n_neighbors, epsilon=self.epsilon)
            finally:
                numba.set_num_threads(previous)

    def nearest_within(self, X, bounds) -> tuple[np.ndarray, np.ndarray]:
        """Exact nearest bank row of queries whose nearest distance has a known upper bound.

        Distances on the bank's leading principal axes are lower bounds of the
        full ones, so only the bank rows whose projected distance to a query
        is within its bound can be its nearest row; those few are compared in
        full. This costs a pass over the projected bank (at most 64 columns)
        instead of the whole one, and gives the same neighbours as exact
        search. Falls back to exact search when the bounds leave too much of
        the bank, and with the exact backend.

        Parameters
        ----------
        X : ndarray of shape (n_queries, n_features_in_), float32
        bounds : ndarray of shape (n_queries,)
            Distances not below each query's nearest distance, e.g. those of
            an approximate search.

        Returns
        -------
        distances : ndarray of shape (n_queries, 1), float32
            Computed from differences (exact search: from the expansion, so
            the two may differ by float32 rounding).
        indices : ndarray of shape (n_queries, 1), int64
        """
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float32, order="C")
        bounds = np.asarray(bounds, dtype=np.float32)
        if bounds.shape != (len(X),):
            raise ValueError(
                f"bounds must have shape ({len(X)},), one per query; got {bounds.shape}."
            )
        if self.principal_axes_ is None:
            return self._exact(X, 1)
        Z = torch.from_numpy(X) @ torch.from_numpy(self.principal_axes_)
        bank_z = torch.from_numpy(self.bank_projected_)
        z_sq, bank_z_sq = _squared_norms(Z), self._bank_projected_sq_norms
        lower_sq = torch.addmm(bank_z_sq[:, None], bank_z, Z.T, alpha=-2.0).T
        # Slack for float32 rounding, of the expansion and of the bounds themselves.
        limit = (
            torch.from_numpy(bounds * (1 + 1e-5)) ** 2
            - z_sq * (1 - 1e-5)
            + 1e-5 * bank_z_sq.max()
        )
        candidates = (lower_sq <= limit[:, None]).numpy()
        if candidates.sum() > candidates.size // 4:  # gathering would cost more than a pass
            return self._exact(X, 1)
        distances = np.empty((len(X), 1), dtype=np.float32)
        indices = np.empty((len(X), 1), dtype=np.int64)
        for i, rows in enumerate(candidates):
            rows = np.flatnonzero(rows)
            if len(rows) == 0:  # only if a bound was not one
                distances[i], indices[i] = self._exact(X[i : i + 1], 1)
                continue
            dist = np.linalg.norm(self.bank_[rows] - X[i], axis=1)
            best = dist.argmin()
            distances[i, 0], indices[i, 0] = dist[best], rows[best]
        return distances, indices

    def largest_nearest(
        self, X, *, groups=None, bank_groups=None, return_bounds: bool = False, grid=None
    ) -> tuple:
        """Exactly, the query of each group farthest from its nearest bank row.

        PatchCore's image score needs only the largest nearest-neighbour
        distance among an image's patches (paper Eq. 6), not every patch's.
        On the CPU, each query is first compared with the cell centres
        (``cell_centres_``, rows of the bank): its distance to the nearest
        bounds its nearest distance from above. The ``4`` queries per group
        with the largest bounds are searched in full; the largest of their
        exact distances is a floor for the group's maximum. The queries whose
        bound reaches the floor (about one in ten) are compared with every
        row of their two nearest cells, which tightens their bounds to,
        usually, their nearest distance; the floors are raised likewise from
        those with the largest new bounds, and only the queries whose bound
        still reaches the floor are searched in full too. On the 83 MVTec
        bottle test images against a 10,240-row Lite0 bank, a median of 9
        queries per image (at most 1,015) reached the cells and 4 to 8 were
        searched in full, images with large defects included: 4.3 ms per
        image, one image per call, against 5.7 ms with every query compared
        with its cells. When many queries are left (their
        bounds were loose, as for training patches scored without their own
        image), they search their next 6 cells first and the floors are raised
        from the tighter bounds: leave-one-out scores of 100 bottle training
        images at 512 px took 7.5 s instead of 26 s that way.
        On other devices, and for banks of at most 512 rows (where one
        product with the whole bank costs less than the cells' products), the
        search is plain and complete.

        Parameters
        ----------
        X : ndarray of shape (n_groups, n_queries, n_features_in_), float32
            Queries in groups, e.g. the patch features of images.
        groups : array-like of shape (n_groups,), default=None
            Integer label of each group, e.g. the training image it is. Given
            together with ``bank_groups``.
        bank_groups : array-like of shape (n_samples_fit_,), default=None
            Integer label of each bank row: a group's queries never match a
            row of its own label (leave-one-image-out scores).
        return_bounds : bool, default=False
            Also return every query's upper bound.
        grid : (h, w), default=None
            If each group is a grid of patches, row by row (``n_queries = h *
            w``): the first bounds come from the nearest rows of a quarter of
            the patches, as their neighbours' (:meth:`_seeded_bounds_sq`),
            rather than from the cell centres. The result is the same. Not
            used with ``groups`` or ``return_bounds``.

        Returns
        -------
        distances : ndarray of shape (n_groups,), float32
            Largest nearest distance of each group, as :meth:`kneighbors`
            with the exact backend (or :func:`exact_kneighbors` with the
            groups) computes it, up to float32 rounding.
        positions : ndarray of shape (n_groups,), int64
            Position of that query in its group (the first one on ties).
        indices : ndarray of shape (n_groups,), int64
            Its nearest bank row.
        bounds : ndarray of shape (n_groups, n_queries), float32
            Only with ``return_bounds``: each query's distance to the nearest
            bank row seen, not below its nearest distance but for float32
            rounding, and most often equal to it (on other devices: that
            distance).
        """
        check_is_fitted(self)
        X = np.ascontiguousarray(X, dtype=np.float32)
        n_groups, n_queries, n_features = X.shape
        flat = X.reshape(-1, n_features)
        group = np.repeat(np.arange(n_groups), n_queries)
        if (groups is None) != (bank_groups is None):
            raise ValueError("groups and bank_groups must be given together.")
        labels = None
        if groups is not None:
            labels, bank_groups = _check_groups(
                np.repeat(np.asarray(groups), n_queries), bank_groups, len(flat), self.n_samples_fit_, 1
            )
        if check_device(self.device).type != "cpu" or self.n_samples_fit_ <= _FULL_SEARCH_MAX_ROWS:
            dist, idx = self._exact(flat, 1, labels, bank_groups)
            found = _group_maxima(group, np.arange(len(flat)), dist[:, 0], idx[:, 0], n_queries)
            return (*found, dist.reshape(n_groups, n_queries)) if return_bounds else found
        q_sq = np.einsum("ij,ij->i", flat, flat)
        centre_rows = self._centre_rows()

        def bounds(queries, ranks):
            # In chunks: a chunk's distances to the centres, its [x, 1] rows and
            # their copies gathered once per cell searched stay within the working
            # memory. No ranks: the distances to the centre rows only.
            cells = 0 if ranks is None else ranks[1] - ranks[0] + 1
            chunk_n_rows = get_chunk_n_rows(
                row_bytes=4 * len(self.cell_bounds_) + 4 * cells * (n_features + 1) + 64,
                max_n_rows=max(1, len(queries)),
                working_memory=_working_memory(self.working_memory, self.bank_.nbytes),
            )
            found = np.empty(len(queries), dtype=np.float32)
            for rows in batches(len(queries), chunk_n_rows):
                chunk = queries[rows]
                chunk_labels = None if labels is None else labels[chunk]
                if ranks is None:
                    found[rows], near_cells[chunk] = self._centre_bounds_sq(
                        flat[chunk], chunk_labels, bank_groups, centre_rows, near_cells.shape[1]
                    )
                else:
                    near = near_cells[chunk, ranks[0] :] if ranks == _FIRST_CELLS and near_cells is not None else None
                    found[rows] = self._cell_bounds_sq(flat[chunk], chunk_labels, bank_groups, ranks, near)
            return np.sqrt(np.maximum(found + q_sq[queries], 0))

        # Slack for float32 rounding of the ||a||² - 2ab + ||b||² expansion.
        slack = 1e-6 * (q_sq + self.bank_sq_norms_.max())
        floor = np.zeros(n_groups, dtype=np.float32)
        searched = []

        def search(rows):
            found = self._exact(flat[rows], 1, None if labels is None else labels[rows], bank_groups)
            return found[0][:, 0], found[1][:, 0]

        def search_floor(candidates):
            # Exact distances of each group's candidates with the largest bounds:
            # a floor for the group's maximum.
            ranked = candidates[np.lexsort((-bound[candidates], group[candidates]))]
            owner = group[ranked]
            rank = np.arange(len(ranked)) - np.searchsorted(owner, owner)
            top = ranked[rank < _FLOOR_QUERIES]
            found = search(top)
            searched.append((top, *found))
            np.maximum.at(floor, group[top], found[0])
            alive = candidates[bound[candidates] ** 2 + slack[candidates] >= floor[group[candidates]] ** 2]
            return np.setdiff1d(alive, top, assume_unique=True)

        alive = np.arange(len(flat))
        bound = np.full(len(flat), np.inf, dtype=np.float32)
        near_cells = None  # each query's nearest cells, when the centre pass ranked them
        if grid is not None and labels is None and not return_bounds:
            if grid[0] * grid[1] != n_queries:
                raise ValueError(f"grid {tuple(grid)} does not hold the {n_queries} queries of a group.")
            bound = np.sqrt(np.maximum(self._seeded_bounds_sq(flat, tuple(grid)) + q_sq, 0))
            alive = search_floor(alive)
        elif centre_rows is not None and not return_bounds:
            # The centres are bank rows, so the distances to them bound every
            # query's nearest distance, loosely (a median 1.14 times it, KolektorSDD
            # Lite0 patches) but enough for a first floor to rule out nine queries
            # in ten before the cells' products. Bounds to be returned come from
            # the cells for all queries: the thresholds' maps are built on them.
            # The same products rank each query's nearest cells for the next pass:
            # at 512 px, three queries in four were still in the running on MVTec
            # screw and transistor, and their products took 2.5 ms per image again.
            near_cells = np.empty((len(flat), min(len(self.cell_bounds_) - 1, _FIRST_CELLS[1])), dtype=np.int64)
            bound = bounds(alive, None)
            alive = search_floor(alive)
        if len(alive):
            bound[alive] = np.minimum(bound[alive], bounds(alive, _FIRST_CELLS))
            alive = search_floor(alive)
        if len(alive) * self.n_samples_fit_ > _MORE_CELLS_MIN_WORK and len(self.cell_bounds_) - 1 > _FIRST_CELLS[1]:
            # Many queries still in the running (their first bounds were loose,
            # and so were the floors, as for training patches whose own image is
            # left out): they search more cells, a few per cent of the bank, and
            # the floors are raised from their tighter bounds.
            bound[alive] = np.minimum(bound[alive], bounds(alive, _MORE_CELLS))
            alive = search_floor(alive)
        if len(alive):
            searched.append((alive, *search(alive)))
        query, dist, idx = (np.concatenate(parts) for parts in zip(*searched))
        found = _group_maxima(group, query, dist, idx, n_queries)
        bound[query] = dist  # exact where searched in full
        return (*found, bound.reshape(n_groups, n_queries)) if return_bounds else found

    def _centre_rows(self) -> np.ndarray | None:
        """Rows of the bank at the cell centres; None if the centres are not rows (pickled so)."""
        if self.cell_centres_ is None:  # pickled before the centres: the bank's first rows
            return np.arange(len(self.cell_bounds_) - 1)
        return self.cell_centre_rows_

    def _centre_products(self, X: np.ndarray) -> torch.Tensor:
        """``||c||² - 2 x·c`` of each query and cell centre, ``(len(X), n_cells)``."""
        centres = self.bank_[: len(self.cell_bounds_) - 1] if self.cell_centres_ is None else self.cell_centres_
        return torch.addmm(
            torch.from_numpy(np.einsum("ij,ij->i", centres, centres)),
            torch.from_numpy(X),
            torch.from_numpy(centres).T,
            alpha=-2.0,
        )

    def _centre_bounds_sq(
        self, X: np.ndarray, labels, bank_groups, centre_rows: np.ndarray, n_near: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """``||b||² - 2 x·b`` for each query's nearest centre row not of its own label.

        Also returns each query's ``n_near`` nearest cells (by centre, own
        label or not), ``(len(X), n_near)``, nearest first.
        """
        partial = self._centre_products(X)
        nearest, near = partial.topk(n_near, dim=1, largest=False)
        if labels is None:
            return nearest[:, 0].numpy(), near.numpy()
        partial.masked_fill_(torch.from_numpy(labels[:, None] == bank_groups[centre_rows][None, :]), torch.inf)
        return partial.amin(dim=1).numpy(), near.numpy()

    def _seeded_bounds_sq(self, X: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
        """``||b||² - 2 x·b`` bounds of patch grids from a quarter of their patches.

        ``X`` holds groups of ``grid = (h, w)`` patches, row by row. The
        patches at even rows and columns (the seeds) search their nearest cell
        for their nearest row; every patch is then compared with the rows found
        for the (up to) four seeds around it. Neighbouring patches share most of
        their 3 x 3 neighbourhood, and so, most often, their nearest row: at
        512 px (MVTec screw and transistor, 4,096 patches against 10,240 rows)
        the seeds' exact nearest rows left a median of 3 to 9 patches per image
        with a bound above the image's largest distance, where the distances to
        the cell centres left three in four. Image scores took 15 instead of
        23 ms (screw) and 18 instead of 22 ms (transistor) per image.
        """
        h, w = grid
        n_features = X.shape[1]
        patches = X.reshape(-1, h, w, n_features)
        seeds = np.ascontiguousarray(patches[:, ::2, ::2]).reshape(-1, n_features)
        rows = self._nearest_rows_in_cells(seeds, _argmin_rows(self._centre_products(seeds))[:, 0].numpy())
        n_groups, hs, ws = patches.shape[0], (h + 1) // 2, (w + 1) // 2
        seed_rows = self.bank_[rows].reshape(n_groups, hs, ws, n_features)
        seed_sq = self.bank_sq_norms_[rows].reshape(n_groups, hs, ws)
        out = np.full((n_groups, h, w), np.inf, dtype=np.float32)
        # Patch (2i + py, 2j + px) against the seeds (i + dy, j + dx) around it, as
        # matching slices of the patch and seed grids: no copies of rows.
        for py, px in itertools.product((0, 1), (0, 1)):
            patch_sub, out_sub = patches[:, py::2, px::2], out[:, py::2, px::2]
            for dy, dx in itertools.product(range(py + 1), range(px + 1)):
                m, n = min(patch_sub.shape[1], hs - dy), min(patch_sub.shape[2], ws - dx)
                dots = np.einsum("gijd,gijd->gij", patch_sub[:, :m, :n], seed_rows[:, dy : dy + m, dx : dx + n])
                np.minimum(out_sub[:, :m, :n], seed_sq[:, dy : dy + m, dx : dx + n] - 2 * dots, out=out_sub[:, :m, :n])
        return out.ravel()

    def _nearest_rows_in_cells(self, X: np.ndarray, cells: np.ndarray) -> np.ndarray:
        """The nearest bank row of each query within one cell, ``cells[i]`` for query ``i``."""
        bounds = self.cell_bounds_.tolist()
        by_cell = np.argsort(cells, kind="stable")
        counts = np.bincount(cells, minlength=len(bounds) - 1)
        ends = np.cumsum(counts).tolist()
        grouped = X[by_cell]  # each cell's queries side by side: slices, not gathers, below
        rows = np.empty(len(X), dtype=np.int64)
        with _ONE_BLAS_THREAD.limit(limits=1, user_api="blas"):
            for c in np.flatnonzero(counts).tolist():
                begin, stop = ends[c] - counts[c], ends[c]
                block = self._block_of_cell(c)
                d = grouped[begin:stop] @ block[:-1]
                d += block[-1]
                rows[by_cell[begin:stop]] = self.cell_order_[bounds[c] + d.argmin(axis=1)]
        return rows

    def _cell_bounds_sq(
        self, X: np.ndarray, labels, bank_groups, ranks: tuple[int, int], near: np.ndarray | None = None
    ) -> np.ndarray:
        """``||b||² - 2 x·b`` for each query's nearest row in some of its nearest cells.

        ``ranks = (first, last)``: the cells searched are each query's
        ``first``-th to ``last``-th nearest (by centre); ``near``, if given,
        holds them already, ``(len(X), n)``. Rows of a query's own label
        (``labels``, ``bank_groups``) are skipped; a query left with none gets
        an infinite bound.
        """
        order, bounds = self.cell_order_, self.cell_bounds_
        n_cells = len(bounds) - 1
        if near is None:
            near = self._centre_products(X).topk(min(n_cells, ranks[1]), dim=1, largest=False).indices[:, ranks[0] :].numpy()
        # Queries sorted by cell, so each cell is one matrix product: hundreds of
        # small products cost less in NumPy than as torch calls, and on one BLAS
        # thread than on idle threads that then compete with torch's.
        cells = near.T.ravel()
        by_cell = np.argsort(cells, kind="stable")
        queries = by_cell % len(X)
        labels_sorted = None if labels is None else labels[queries]
        ends = np.cumsum(np.bincount(cells, minlength=n_cells)).tolist()
        nearest = np.empty(len(cells), dtype=np.float32)
        cell_bounds = bounds.tolist()
        with _ONE_BLAS_THREAD.limit(limits=1, user_api="blas"):
            begin = 0  # of the current cell's queries
            for c, stop in enumerate(ends):
                if stop == begin:
                    continue
                rows = slice(cell_bounds[c], cell_bounds[c + 1])
                block = self._block_of_cell(c)
                # Each cell gathers its own queries: small copies that stay in
                # cache, where one gather of all (a fresh array of every query
                # twice) cost 10 ms of page faults per 512-px image.
                d = X[queries[begin:stop]] @ block[:-1]
                d += block[-1]
                if labels is not None:
                    d[labels_sorted[begin:stop, None] == bank_groups[None, order[rows]]] = np.inf
                np.minimum.reduce(d, axis=1, out=nearest[begin:stop])
                begin = stop
        # Back to query order: each query's cells, side by side.
        unsorted = np.empty_like(nearest)
        unsorted[by_cell] = nearest
        return unsorted.reshape(near.shape[1], len(X)).min(axis=0)

    def _block_of_cell(self, c: int) -> np.ndarray:
        """:meth:`_cell_block` of cell ``c``'s rows: a view of ``cell_blocks_`` where kept."""
        start, stop = self.cell_bounds_[c], self.cell_bounds_[c + 1]
        if self.cell_blocks_ is None:
            return self._cell_block(self.cell_order_[start:stop])
        width = self.n_features_in_ + 1
        return self.cell_blocks_[width * start : width * stop].reshape(width, -1)

    def _cell_block(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``[-2 b, ||b||²]`` of bank ``rows``, transposed: ``(n_features_in_ + 1, len(rows))``.

        ``x @ block[:-1] + block[-1]`` gives ``||b||² - 2 x·b``. Written into
        ``out`` when given.
        """
        block = np.empty((self.n_features_in_ + 1, len(rows)), dtype=np.float32) if out is None else out
        np.multiply(self.bank_[rows].T, -2.0, out=block[:-1])
        block[-1] = self.bank_sq_norms_[rows]
        return block

    def _exact(self, X, n_neighbors, labels=None, bank_groups=None):
        # Straight to the search: re-validating the bank on every call would
        # cost as much as searching it for a few queries.
        device = check_device(self.device)
        if labels is not None:
            labels, bank_groups = torch.from_numpy(labels).to(device), torch.from_numpy(bank_groups).to(device)
        return _search(
            torch.from_numpy(X).to(device),
            torch.from_numpy(self.bank_).to(device),
            torch.from_numpy(self.bank_sq_norms_).to(device),
            n_neighbors,
            labels,
            bank_groups,
            self.working_memory,
        )
