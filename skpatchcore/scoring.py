"""Image-level anomaly scores from patch nearest neighbours (paper Sec. 3.3, Eq. 6-7)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

__all__ = ["max_patches", "rerank_max_patches", "reweighted_scores"]


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
    exact_nn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    chunk: int = 16,
):
    """Exact :func:`max_patches` from approximate nearest neighbours.

    An approximate search returns *some* bank entry, so its distance can only
    over-estimate the true nearest distance. Patches are therefore checked
    exactly in decreasing approximate distance, and the scan stops once the
    next approximate distance falls below the best exact one found: no later
    patch can beat it. Typically a few dozen exact queries per image instead of
    all of them.

    Parameters
    ----------
    patches : ndarray of shape (n_images, n_patches, D)
    patch_dist : ndarray of shape (n_images, n_patches)
        Approximate nearest distances (upper bounds of the exact ones).
    exact_nn : callable
        Exact 1-NN: ``(q, D)`` queries to distances and indices of shape ``(q, 1)``.
    chunk : int, default=16
        Patches checked per exact query.

    Returns
    -------
    s_star, patch, bank_idx : as :func:`max_patches`, exact.
    """
    n_images = len(patch_dist)
    s_star = np.empty(n_images, dtype=np.float32)
    best_patch = np.empty(n_images, dtype=np.int64)
    bank_idx = np.empty(n_images, dtype=np.int64)
    order = np.argsort(-patch_dist, axis=1, kind="stable")
    for i in range(n_images):
        best = -1.0
        for start in range(0, order.shape[1], chunk):
            candidates = order[i, start : start + chunk]
            if patch_dist[i, candidates[0]] < best:
                break
            dist, idx = exact_nn(patches[i, candidates])
            j = int(dist[:, 0].argmax())
            if dist[j, 0] > best:
                best, best_patch[i], bank_idx[i] = float(dist[j, 0]), candidates[j], idx[j, 0]
        s_star[i] = best
    return s_star, best_patch, bank_idx


def reweighted_scores(
    test_features: np.ndarray,
    bank: np.ndarray,
    support_idx: np.ndarray,
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
    bank : ndarray of shape (n_bank, D)
    support_idx : ndarray of shape (n_images, b)
        Bank neighbours of ``m*``, ``m*`` first. With ``b == 1`` there is
        nothing to weigh against and ``s*`` is returned unchanged.

    Returns
    -------
    scores : ndarray of shape (n_images,), float32
    """
    support = torch.from_numpy(bank[support_idx])  # (n, b, D)
    query = torch.from_numpy(np.ascontiguousarray(test_features, dtype=np.float32))
    dist = torch.linalg.vector_norm(support - query[:, None, :], dim=2)
    if dist.shape[1] < 2:
        return dist[:, 0].numpy()
    weight = 1.0 - torch.softmax(dist, dim=1)[:, 0]
    return (weight * dist[:, 0]).numpy()
