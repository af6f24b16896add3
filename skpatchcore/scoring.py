"""Image-level anomaly scores from patch nearest neighbours (paper Sec. 3.3, Eq. 6-7)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from ._memory import empty

__all__ = ["image_scores", "max_patches", "rerank_max_patches", "reweighted_scores", "search_batches"]

# Bytes of patch features per image-score search: a call shares its passes
# over the bank and its per-cell products among its images. On MVTec screw
# (10,240-row banks, exact), image scores took 4.4 -> 2.8 ms per image at
# 256 px (4 -> 16 images a call, 2.5 MB) and 15.6 -> 10 ms at 512 px (1 -> 4
# images, 22 MB); twice as many images gained 5-10 % more. 24 MiB joins 40
# images at 256 px and 4 at 512 px.
SEARCH_BYTES = 24 * 2**20


def max_patches(patch_dist: np.ndarray, patch_idx: np.ndarray):
    """The most anomalous patch of each image (Eq. 6).

    Parameters
    ----------
    patch_dist : ndarray of shape (n_images, n_patches)
        Distance of each patch to its nearest memory-bank entry.
    patch_idx : ndarray of shape (n_images, n_patches)
        Index of that entry.

    Returns
    -------
    s_star : ndarray of shape (n_images,)
        Largest patch distance ``s*``.
    patch : ndarray of shape (n_images,)
        Position of that patch in the image's patch list.
    bank_idx : ndarray of shape (n_images,)
        Its nearest bank entry ``m*``.
    """
    rows = np.arange(len(patch_dist))
    patch = patch_dist.argmax(axis=1)
    return patch_dist[rows, patch], patch, patch_idx[rows, patch]


def rerank_max_patches(
    patches: np.ndarray,
    patch_dist: np.ndarray,
    exact_nn: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    first: int = 4,
):
    """Exact :func:`max_patches` from approximate nearest neighbours.

    An approximate search returns *some* bank entry, so its distance can only
    over-estimate the true nearest distance. A patch whose approximate
    distance is below the best exact distance found so far therefore cannot be
    the maximum. Each round searches exactly, for all images in one query,
    the next patches in decreasing approximate distance whose bound still
    reaches their image's best exact distance: ``first`` of them per image,
    then twice as many each round, until none is left.

    The top few are checked together because the patch with the largest
    approximate distance is often one the search over-estimated, whose exact
    distance would prune little. On MVTec bottle features with the defaults of
    :class:`~skpatchcore.NearestNeighborIndex`, ``first=4`` settled 95 % of the images in one round, checking
    about 5 patches per image where one-at-a-time checking needs 2-3.

    Parameters
    ----------
    patches : ndarray of shape (n_images, n_patches, D)
    patch_dist : ndarray of shape (n_images, n_patches)
        Approximate nearest distances (upper bounds of the exact ones).
    exact_nn : callable
        Exact 1-NN: ``(q, D)`` queries and their approximate distances (upper
        bounds, which the search may use) to distances and indices of shape
        ``(q, 1)``.
    first : int, default=4
        Patches per image checked in the first round.

    Returns
    -------
    s_star, patch, bank_idx : as :func:`max_patches`, exact.
    """
    n_images = len(patch_dist)
    order = np.argsort(-patch_dist, axis=1, kind="stable")
    bounds = np.take_along_axis(patch_dist, order, axis=1)  # descending per row
    s_star = np.full(n_images, -np.inf, dtype=np.float32)
    best_patch = np.zeros(n_images, dtype=np.int64)
    bank_idx = np.zeros(n_images, dtype=np.int64)
    checked = np.zeros(n_images, dtype=np.int64)  # a prefix of each row of ``order``
    width = first
    while True:
        # Sorted bounds: the patches that can still win are a prefix of each row.
        reach = (bounds >= s_star[:, None]).sum(axis=1)
        take = np.clip(reach - checked, 0, width)
        if not take.any():
            break
        rows = np.repeat(np.arange(n_images), take)
        ranks = checked[rows] + np.arange(len(rows)) - np.repeat(np.cumsum(take) - take, take)
        cols = order[rows, ranks]
        dist, idx = exact_nn(patches[rows, cols], patch_dist[rows, cols])
        # The farthest candidate of each image in this round.
        by_row = np.lexsort((-dist[:, 0], rows))
        top = by_row[np.r_[True, rows[by_row][1:] != rows[by_row][:-1]]]
        gain = top[dist[top, 0] > s_star[rows[top]]]
        s_star[rows[gain]] = dist[gain, 0]
        best_patch[rows[gain]] = cols[gain]
        bank_idx[rows[gain]] = idx[gain, 0]
        checked += take
        width *= 2
    return s_star, best_patch, bank_idx


def image_scores(
    index, patches: np.ndarray, n_neighbors: int, *, patch_distances: bool = True, grid=None
):
    """Patch distances and image scores of images' patch features (Eq. 6-7).

    Parameters
    ----------
    index : NearestNeighborIndex or ShardedIndex
        Fitted index of the memory bank: anything with ``kneighbors``,
        ``largest_nearest``, ``bank_neighbors``, ``n_samples_fit_`` and
        ``algorithm_`` (and ``nearest_within`` when not exact).
    patches : ndarray of shape (n_images, n_patches, D), float32
    n_neighbors : int
        Bank neighbours ``b`` of ``m*`` weighed by the reweighting (at most
        the bank size): ``m*`` itself first, found by one exact search per
        image, as cheap as a single patch query.
    patch_distances : bool, default=True
        Whether every patch's nearest distance is needed (for maps). Without
        them, only each image's most anomalous patch is searched for, exactly
        (:meth:`~skpatchcore.NearestNeighborIndex.largest_nearest`), at a
        fraction of the cost of a full search.
    grid : (h, w), default=None
        The patches' grid, row by row (``n_patches = h * w``): the search for
        the largest distance starts from its neighbouring patches' nearest
        rows (same result, less work).

    Returns
    -------
    scores : ndarray of shape (n_images,), float32
        Reweighted largest patch distances, the same with either backend of
        ``index``: an approximate search's maximum is re-ranked exactly.
    patch_dist : ndarray of shape (n_images, n_patches), float32, or None
        Nearest distance of each patch as the backend found it (approximate
        search: an upper bound of the exact one); None unless
        ``patch_distances``.
    """
    n_images, n_patches, dim = patches.shape
    dist = None
    if not patch_distances:
        _, patch, nearest = index.largest_nearest(patches, grid=grid)
    else:
        dist, idx = index.kneighbors(patches.reshape(-1, dim), 1)
        dist, idx = dist[:, 0].reshape(n_images, n_patches), idx[:, 0].reshape(n_images, n_patches)
        if index.algorithm_ == "exact":
            _, patch, nearest = max_patches(dist, idx)
        else:
            _, patch, nearest = rerank_max_patches(patches, dist, index.nearest_within)
    _, support = index.bank_neighbors(nearest, min(n_neighbors, index.n_samples_fit_))
    scores = reweighted_scores(patches[np.arange(n_images), patch], support)
    return scores, dist


def search_batches(
    patch_batches: Iterable, max_bytes: int = SEARCH_BYTES
) -> Iterator[tuple[slice, np.ndarray]]:
    """Consecutive batches of patch features joined into batches of up to ``max_bytes``.

    Parameters
    ----------
    patch_batches : iterable of (slice, torch.Tensor of shape (b, h, w, D))
        Consecutive batches of images of one size, as the network gives them.
    max_bytes : int, default=SEARCH_BYTES
        Size of a joined batch's float32 features: as many whole images as
        fit, at least one. A network batch of at least that many images
        passes as it is.

    Yields
    ------
    batch : slice
        Positions of the joined batch's images.
    patches : ndarray of shape (b', h, w, D), float32
        On the CPU. Joined batches are views of one buffer, which the next
        one overwrites: use each before asking for the next.
    """
    buffer, start, filled = None, 0, 0
    for batch, patches in patch_batches:
        patches = patches.cpu().numpy()
        n, h, w, dim = patches.shape
        capacity = max(1, max_bytes // (4 * h * w * dim))
        if filled and filled + n > capacity:
            yield slice(start, start + filled), buffer[:filled]
            filled = 0
        if n >= capacity:
            yield batch, patches
            continue
        if buffer is None:
            buffer = empty((capacity, h, w, dim))
        if not filled:
            start = batch.start
        buffer[filled : filled + n] = patches
        filled += n
    if filled:
        yield slice(start, start + filled), buffer[:filled]


def reweighted_scores(
    test_features: np.ndarray,
    bank: np.ndarray,
    support_idx: np.ndarray | None = None,
) -> np.ndarray:
    """Image anomaly scores with the paper's reweighting (Eq. 7).

    ``s = (1 - softmax(d)_0) * s*``, where ``d`` are the distances from the
    image's most anomalous patch to the ``b`` bank neighbours of its nearest
    entry ``m*`` (``m*`` first, so ``d_0 = s*``). A test patch whose nearest
    entry is itself isolated in the bank (a rare nominal pattern) keeps more
    of its score than one near a dense cluster of equally distant entries.

    Distances are recomputed here from differences rather than taken from the
    search's ``||a||^2 - 2ab + ||b||^2`` expansion, whose float32 rounding
    depends on the batch: scores then do not change with batch composition.

    Parameters
    ----------
    test_features : ndarray of shape (n_images, D)
        Each image's most anomalous patch feature.
    bank : ndarray of shape (n_bank, D), or (n_images, b, D)
        The memory bank; or, without ``support_idx``, the support rows
        themselves (``bank[support_idx]``), as a bank split over machines
        returns them.
    support_idx : ndarray of shape (n_images, b), default=None
        Bank neighbours of ``m*``, ``m*`` first. With ``b == 1`` there is
        nothing to weigh against and ``s*`` is returned unchanged.

    Returns
    -------
    scores : ndarray of shape (n_images,), float32
    """
    support = torch.from_numpy(np.asarray(bank if support_idx is None else bank[support_idx]))  # (n, b, D)
    query = torch.from_numpy(np.ascontiguousarray(test_features, dtype=np.float32))
    dist = torch.linalg.vector_norm(support - query[:, None, :], dim=2)
    if dist.shape[1] < 2:
        return dist[:, 0].numpy()
    weight = 1.0 - torch.softmax(dist, dim=1)[:, 0]
    return (weight * dist[:, 0]).numpy()
