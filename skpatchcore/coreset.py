"""Greedy k-center coreset subsampling (PatchCore, Roth et al. CVPR 2022, Sec. 3.2)."""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.random_projection import GaussianRandomProjection
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from ._device import check_device
from ._memory import batches

__all__ = [
    "GreedyCoresetSampler",
    "ProjectedRows",
    "coreset_size",
    "covering_radius",
    "k_center_greedy",
    "merge_coresets",
]

# Minimum squared distance of the points already chosen: below every real squared
# distance, so they are never picked again, even when only duplicates remain.
_SELECTED = -1.0

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Rows of the projected copy processed at a time, in a pass or in a gather (1 MiB at 128
# dims). Buffers of that size are reused: fresh temporaries would grow the process's
# memory, as the C allocator keeps much of what it frees.
_CHUNK_ROWS = 2_048
# Elements of a (new centres x points) bound matrix evaluated at a time (2 MiB), and
# most points screened at once (1 MiB of coarse coordinates).
_BOUND_ELEMENTS, _SCREEN_ROWS = 1 << 19, 1 << 14
# Block of candidate centres examined at once by the accelerated method.
_MIN_BLOCK, _MAX_BLOCK = 8, 256
# Leading coordinates (principal axes) that bound distances from below in the accelerated
# method: a coarse screen of every candidate pair, then a finer one of the pairs left.
_COARSE_DIM, _FINE_DIM = 16, 32
# Up to this many point-centre distances, the accelerated method makes the plain passes:
# its bounds cost more to set up and update than they save (54 of 5,400 Lite0 patches:
# 19 ms plain, 37 ms accelerated; 270 of them: 88 ms against 45 ms).
_PLAIN_MAX_WORK = 1 << 20
# Fewest points a thread of the accelerated method screens: below, waiting for the
# threads every round would cost more than it saves.
_MIN_SHARE_ROWS = 1 << 14
# Largest dimension rotated onto its principal axes (the rotation costs n * dim^2).
_MAX_ROTATED_DIM = 256


def _sq_norms(Z: torch.Tensor) -> torch.Tensor:
    """Squared row norms, float32, of ``Z`` (n, d) in any stored dtype."""
    out = torch.empty(len(Z), device=Z.device)
    for b in batches(len(Z), _CHUNK_ROWS):
        torch.linalg.vector_norm(Z[b], dim=1, dtype=torch.float32, out=out[b])
    return out.square_()


def _distances_to(Z, centre, out, scratch):
    """Squared distances of every row of ``Z`` to ``centre`` (float32), one pass over ``Z``.

    Summed as ``sum((x - c)^2)`` row by row: unlike a BLAS matrix-vector
    product, whose rounding depends on how many rows it is given, this gives
    the same bits for a row whether it comes in a full pass or in a gathered
    subset, so the accelerated method reproduces the plain greedy sequence.
    """
    for b in batches(len(Z), _CHUNK_ROWS):
        diff = torch.sub(Z[b], centre, out=scratch[: b.stop - b.start])  # float32
        torch.sum(diff.square_(), 1, out=out[b])
    return out


def _scratch(Z):
    """Reusable float32 buffer of ``_CHUNK_ROWS`` rows of ``Z``."""
    return torch.empty(_CHUNK_ROWS, Z.shape[1], device=Z.device)


def _pairwise_sq(A, A_sq, B, B_sq):
    """(len(A), len(B)) squared distances by matrix product; for bounds only."""
    return torch.addmm(A_sq[:, None], A, B.T, alpha=-2).add_(B_sq).clamp_(min=0)


def _plain_greedy(Z, n_centers, initial, verbose):
    """Greedy k-center as in PatchCore Alg. 1: one pass over ``Z`` per centre.

    ``initial`` (int64 tensor) holds the first centres, taken as they are.
    """
    n = len(Z)
    min_sq = torch.full((n,), math.inf, device=Z.device)
    dist, scratch = torch.empty(n, device=Z.device), _scratch(Z)
    selected = torch.empty(n_centers, dtype=torch.long, device=Z.device)
    report = _Progress(n_centers, verbose)
    for i in range(n_centers):
        idx = int(initial[i]) if i < len(initial) else int(min_sq.argmax())  # first among ties
        selected[i] = idx
        torch.minimum(min_sq, _distances_to(Z, Z[idx].float(), dist, scratch), out=min_sq)
        min_sq[idx] = _SELECTED
        report(i + 1, min_sq)
    return selected, min_sq


class _Share:
    """A contiguous share of the points, screened and updated by one thread.

    Views of the selection's arrays (updates write through), with buffers of
    its own.
    """

    def __init__(self, rows: slice, Z, coarse, fine, coarse_sq, fine_sq, min_sq, nearest):
        self.Z, self.coarse, self.fine = Z[rows], coarse[rows], fine[rows]
        self.coarse_sq, self.fine_sq = coarse_sq[rows], fine_sq[rows]
        self.min_sq, self.nearest = min_sq[rows], nearest[rows]
        # dist: exact distances of a full pass, or the coarse bounds of a screen.
        self.dist, self.scratch = torch.empty(len(self.Z), device=Z.device), _scratch(Z)
        self.rows = torch.empty(_CHUNK_ROWS, Z.shape[1], dtype=Z.dtype, device=Z.device)


def _accelerated_greedy(Z, n_centers, initial, verbose, n_threads=1):
    """Same sequence as :func:`_plain_greedy`, with most of its work pruned.

    Each round takes the ``block`` farthest points and picks among them
    alone, lowering the rest of the block by their exact distances to each
    pick, for as long as one stays above the block's floor (no point outside
    lies farther): those are exactly the next greedy picks (see
    :func:`_next_picks`). A point x at distance r of its nearest centre p is
    then updated only where two lower bounds of d(x, c), for a new centre c,
    fall below r: the triangle inequality ``d(x, c) >= d(p, c) - r`` (so
    ``d(p, c) >= 2 r`` rules x out) and the distance on the leading 16, then
    32, columns, lower bounds that are tight when those are the principal
    axes (as :class:`ProjectedRows` arranges). Survivors get the exact distance,
    computed as the plain method does. The centres given in ``initial`` go
    through the same update, in blocks, before the greedy picks.

    With ``n_threads`` > 1 the points are split into that many shares, each
    screened and updated by its own thread (torch releases the GIL in its
    ops); the picks, and so the sequence, are the same.
    """
    n, dim = Z.shape
    start = int(initial[0])
    device = Z.device
    sq_norms = _sq_norms(Z)
    # Bounds use |a|^2 - 2 a.b + |b|^2 by matrix products; this covers their rounding.
    tol = 16 * dim * torch.finfo(torch.float32).eps * float(sq_norms.max())
    q1, q2 = min(_COARSE_DIM, dim), min(_FINE_DIM, dim)
    # A contiguous copy of the leading columns: the screens read them for every
    # point each round, and a copy streams through the caches 1.3x faster than
    # the same columns read out of Z's rows.
    fine = Z[:, :q2].contiguous()
    coarse = fine[:, :q1]
    coarse_sq, fine_sq = _sq_norms(coarse), _sq_norms(fine)
    centers_fine = torch.empty(n_centers, q2, device=device)
    centers_fine[0] = fine[start]
    positions = torch.arange(_MAX_BLOCK, device=device)

    min_sq = _distances_to(Z, Z[start].float(), torch.empty(n, device=device), _scratch(Z))
    min_sq[start] = _SELECTED
    nearest = torch.zeros(n, dtype=torch.long, device=device)  # selection position
    selected = torch.empty(n_centers, dtype=torch.long, device=device)
    selected[0] = start
    report = _Progress(n_centers, verbose)
    shares = [
        _Share(rows, Z, coarse, fine, coarse_sq, fine_sq, min_sq, nearest)
        for rows in batches(n, -(-n // n_threads))
    ]

    with ThreadPoolExecutor(len(shares), initializer=torch.set_num_threads, initargs=(1,)) as pool:
        t, block = 1, _MIN_BLOCK
        while t < n_centers:
            if t < len(initial):  # given centres: nothing to choose, only the update below
                far = initial[t : min(len(initial), t + _MAX_BLOCK)]
                size = len(far)
                C, C_sq = Z.index_select(0, far).float(), sq_norms.index_select(0, far)
            else:
                far, C, C_sq, size = _next_picks(Z, sq_norms, min_sq, min(block, n_centers - t))

            # Triangle inequality through each point's nearest centre p, for the closest new
            # centre; d(p, c) is itself bounded below on the fine coordinates, 4x cheaper.
            C_fine, C_fine_sq = C[:, :q2], fine_sq.index_select(0, far)
            via = _min_pairwise_sq(
                centers_fine[:t], fine_sq.index_select(0, selected[:t]), C_fine, C_fine_sq
            )
            via.sub_(tol).mul_(0.25)  # d(p, c)^2 < 4 r^2 + tol, with one comparison per point
            new = (C, C[:, :q1], coarse_sq.index_select(0, far), C_fine, C_fine_sq, via, t, tol)
            if len(shares) == 1:
                _update_share(shares[0], *new)
            else:
                list(pool.map(lambda share: _update_share(share, *new), shares))

            min_sq.index_fill_(0, far, _SELECTED)
            nearest.index_copy_(0, far, positions[:size] + t)
            selected[t : t + size], centers_fine[t : t + size] = far, C_fine
            t += size
            block = min(_MAX_BLOCK, max(_MIN_BLOCK, 2 * size))
            report(t, min_sq)
    return selected, min_sq


def _update_share(share, C, C_coarse, C_coarse_sq, C_fine, C_fine_sq, via, t, tol):
    """Lower ``min_sq`` and ``nearest`` of one share's points for the new centres ``C``
    (selection positions ``t``, ``t + 1``, ...), where the bounds cannot rule them out."""
    n, size = len(share.Z), len(C)
    min_sq, coarse, fine = share.min_sq, share.coarse, share.fine
    near = (via.index_select(0, share.nearest) < min_sq).nonzero().squeeze(1)

    # Leading-coordinate bounds |s_x - s_c|^2 < r^2, written for a matrix product as
    # |s_c|^2 - 2 s_x.s_c < r^2 - |s_x|^2 + tol: coarse for all, fine for the points left.
    rhs = min_sq.sub(share.coarse_sq).add_(tol)
    dense = len(near) > n // 2  # then read the coordinates in place rather than gather
    step = max(1, min(_BOUND_ELEMENTS // size, _SCREEN_ROWS))
    lower = share.dist[: n if dense else len(near)]  # closest new centre, coarse
    for b in batches(len(lower), step):
        S = coarse[b] if dense else coarse.index_select(0, near[b])
        torch.amin(torch.addmm(C_coarse_sq[:, None], C_coarse, S.float().T, alpha=-2), 0, out=lower[b])
    if dense:
        points = (lower < rhs).nonzero().squeeze(1)
    else:
        points = near.index_select(0, (lower < rhs.index_select(0, near)).nonzero().squeeze(1))

    for i, b in enumerate(batches(len(points), step)):
        idx = points[b]
        G = torch.addmm(C_fine_sq[:, None], C_fine, fine.index_select(0, idx).float().T, alpha=-2)
        R = min_sq.index_select(0, idx).sub_(share.fine_sq.index_select(0, idx)).add_(tol)
        owner, which = (G < R).nonzero().unbind(1)
        if dense and i == 0 and 4 * len(owner) > size * (int(idx[-1]) + 1):
            # The bounds keep most pairs (early on, or data without low-dimensional
            # structure): plain passes over Z cost less than gathering them.
            _full_passes(share.Z, min_sq, share.nearest, C, t, share.dist, share.scratch)
            break
        _update_exact(
            share.Z, min_sq, share.nearest, idx.index_select(0, which), owner, C, t, share.rows, share.scratch
        )


def _next_picks(Z, sq_norms, min_sq, block):
    """The next greedy picks, found among the ``block`` farthest points alone.

    No point outside the block lies farther than the block's nearest, its
    floor; so while some point of the block, lowered by its exact distances
    to the picks made, still lies above the floor, the farthest such point
    (the first on ties) is exactly the plain method's next choice. Returns
    ``far, C, C_sq, size``.
    """
    far_sq, far = torch.topk(min_sq, block)
    # In index order, so that argmax takes the first of equal values, as the plain method.
    far, order = torch.sort(far)
    C = Z.index_select(0, far).float()
    lowered = far_sq.index_select(0, order).cpu().numpy()
    floor = lowered.min()
    picks, diff, dist = [], torch.empty_like(C), torch.empty(len(C), device=C.device)
    while len(picks) < block:
        j = int(np.argmax(lowered))
        if not lowered[j] > floor:
            break
        picks.append(j)
        lowered[j] = -math.inf
        # As _distances_to sums them, so the lowered values are the plain method's.
        torch.sum(torch.sub(C, C[j], out=diff).square_(), 1, out=dist)
        np.minimum(lowered, dist.cpu().numpy(), out=lowered)
    if not picks:  # every point of the block ties with the floor: the plain argmax
        far = min_sq.argmax().view(1)
        return far, Z.index_select(0, far).float(), sq_norms.index_select(0, far), 1
    picks = torch.tensor(picks, device=C.device)
    far = far.index_select(0, picks)
    return far, C.index_select(0, picks), sq_norms.index_select(0, far), len(picks)


def _min_pairwise_sq(A, A_sq, B, B_sq):
    """For each row of ``A``, its smallest squared distance to a row of ``B`` (bounds only)."""
    out = torch.empty(len(A), device=A.device)
    for b in batches(len(A), max(1, _BOUND_ELEMENTS // len(B))):
        torch.amin(_pairwise_sq(A[b], A_sq[b], B, B_sq), 1, out=out[b])
    return out


def _full_passes(Z, min_sq, nearest, C, t, dist, scratch):
    """Plain passes over ``Z`` for the centres ``C`` (positions ``t``, ``t + 1``, ...)."""
    for j, centre in enumerate(C):
        d = _distances_to(Z, centre, dist, scratch)
        closer = (d < min_sq).nonzero().squeeze(1)
        min_sq.index_copy_(0, closer, d.index_select(0, closer))
        nearest.index_fill_(0, closer, t + j)


def _update_exact(Z, min_sq, nearest, points, owner, C, t, rows, scratch):
    """Exact distances of ``points[i]`` to ``C[owner[i]]``; lower ``min_sq`` and ``nearest``.

    ``C[j]`` is the centre at selection position ``t + j``; ``rows`` (in the
    dtype of ``Z``) and ``scratch`` (float32) are buffers of ``_CHUNK_ROWS`` rows.
    """
    for b in batches(len(points), _CHUNK_ROWS):
        idx, centre = points[b], owner[b]
        m = len(idx)
        diff = scratch[:m]
        torch.index_select(C, 0, centre, out=diff)
        torch.sub(torch.index_select(Z, 0, idx, out=rows[:m]), diff, out=diff)
        d = diff.square_().sum(1)
        before = min_sq.index_select(0, idx)
        min_sq.scatter_reduce_(0, idx, d, "amin")
        closer = ((d < before) & (d == min_sq.index_select(0, idx))).nonzero().squeeze(1)
        nearest.index_copy_(0, idx.index_select(0, closer), centre.index_select(0, closer) + t)


# The torch thread setting of the code that entered the outermost _one_cpu_thread.
_CALLER = threading.local()


@contextmanager
def _one_cpu_thread(device):
    """Run torch CPU ops on one thread, then restore the caller's setting.

    The selection is a long chain of small dependent ops: a second OpenMP
    thread gains little on them, and on a busy machine its synchronisation
    made the selection up to 17 times slower (measured on 2 cores). The
    caller's setting stays readable by :func:`_caller_threads`: the
    accelerated method spreads its points over that many Python threads
    instead, which wait for each other without spinning.
    """
    previous, outer = torch.get_num_threads(), getattr(_CALLER, "threads", None)
    _CALLER.threads = outer or previous
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
        _CALLER.threads = outer


def _caller_threads() -> int:
    """torch's thread setting outside any :func:`_one_cpu_thread`."""
    return getattr(_CALLER, "threads", None) or torch.get_num_threads()


class _Progress:
    """sklearn-style progress lines, about ten per fit when ``verbose`` > 0."""

    def __init__(self, total, verbose):
        self.total, self.verbose = total, verbose
        self.every = max(1, total // 10)
        self.next = self.every
        self.start = time.perf_counter()

    def __call__(self, done, min_sq):
        if not self.verbose or (done < self.next and done < self.total):
            return
        self.next = (done // self.every + 1) * self.every
        radius = math.sqrt(max(float(min_sq.max()), 0.0))
        print(
            f"[GreedyCoresetSampler] {done}/{self.total} centres, "
            f"radius {radius:.4g}, {time.perf_counter() - self.start:.2f} s"
        )


def coreset_size(coreset_ratio: float, n_samples: int) -> int:
    """Rows kept: ``max(1, ceil(coreset_ratio * n_samples))``.

    The product is rounded to 6 decimals first, so that ``0.7 * 10`` keeps 7
    rows and not 8 through floating-point noise.
    """
    return max(1, math.ceil(round(coreset_ratio * n_samples, 6)))


def k_center_greedy(
    Z: torch.Tensor,
    n_centers: int,
    start,
    *,
    method: str = "accelerated",
    verbose: int = 0,
) -> tuple[torch.Tensor, float]:
    """Greedy k-center selection on the rows of ``Z`` (PatchCore Alg. 1).

    Parameters
    ----------
    Z : torch.Tensor of shape (n_samples, n_dims)
        Points, float32, float16 or bfloat16 (distances are accumulated in
        float32). The accelerated method prunes best on centred points whose
        leading columns are the principal axes, as
        :class:`GreedyCoresetSampler` prepares them; any points give the
        same result.
    n_centers : int
        Number of points to select, in ``[1, n_samples]``.
    start : int or array-like of int
        Index of the first centre; or indices of the first centres, distinct,
        taken as they are before the greedy picks continue from them (how
        :meth:`PatchCoreDetector.partial_fit` extends a memory bank). Greedy
        is memoryless: continuing from the first ``m`` centres of a greedy
        run repeats the rest of that run.
    method : {"accelerated", "greedy"}, default="accelerated"
        ``"greedy"`` makes one pass over ``Z`` per centre; ``"accelerated"``
        selects the same sequence with bounds that skip most of the work; see
        :class:`GreedyCoresetSampler`. For small selections (``n_centers *
        n_samples`` up to 2**20) ``"accelerated"`` makes the plain passes,
        which then cost less than its bounds.
    verbose : int, default=0
        Print progress when positive.

    Returns
    -------
    indices : torch.Tensor of shape (n_centers,), int64
        Selected rows, in selection order (``start`` first).
    radius : float
        Coverage radius: largest distance of a row to its nearest selected row.
    """
    if method not in ("accelerated", "greedy"):
        raise ValueError(f"method must be 'accelerated' or 'greedy'; got {method!r}.")
    initial = np.atleast_1d(np.asarray(start))
    if (
        initial.ndim != 1
        or not np.issubdtype(initial.dtype, np.integer)
        or not 1 <= len(initial) <= n_centers <= len(Z)
        or initial.min() < 0
        or initial.max() >= len(Z)
        or len(np.unique(initial)) != len(initial)
    ):
        raise ValueError(
            f"Expected 1 <= n_centers <= {len(Z)} and start one index, or distinct indices, "
            f"in [0, {len(Z)}) for {len(Z)} rows, at most n_centers of them; got "
            f"n_centers={n_centers}, start={start if initial.size <= 8 else initial.shape}."
        )
    initial = torch.as_tensor(initial, dtype=torch.long, device=Z.device)
    if method == "accelerated" and n_centers * len(Z) > _PLAIN_MAX_WORK:
        # Threads of torch's setting, each with a share of at least _MIN_SHARE_ROWS points.
        n_threads = 1 if Z.device.type != "cpu" else max(1, min(_caller_threads(), len(Z) // _MIN_SHARE_ROWS))
        run = partial(_accelerated_greedy, n_threads=n_threads)
    else:
        run = _plain_greedy
    with _one_cpu_thread(Z.device):
        indices, min_sq = run(Z, n_centers, initial, verbose)
    return indices, math.sqrt(max(float(min_sq.max()), 0.0))


def covering_radius(X, centres, *, device="cpu") -> float:
    """Covering radius of ``centres`` over the rows of ``X``, exact.

    The largest distance of a row of ``X`` to its nearest row of
    ``centres``: how far the worst-covered training patch lies from the
    memory bank, in the full feature space. This is the quantity greedy
    k-center minimises (approximately, on a projection); it is the measure by
    which the sharded fit, :meth:`PatchCoreDetector.partial_fit` and a
    refit are compared.

    Parameters
    ----------
    X : array-like or torch.Tensor of shape (n_samples, n_features)
        Points to cover, e.g. all training patch features.
    centres : array-like or torch.Tensor of shape (n_centres, n_features)
        E.g. ``memory_bank_``.
    device : str or torch.device, default="cpu"
        Where the exact search runs.

    Returns
    -------
    radius : float
        ``max_i min_j ||X_i - centres_j||``, from the exact search's float32
        expansion (near-duplicate pairs read up to about ``5e-4 * ||x||``
        instead of 0; the maximum is set by far pairs, where it is exact to
        float32 rounding).

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore.coreset import covering_radius
    >>> covering_radius(np.array([[0.0, 0.0], [3.0, 4.0]]), np.array([[0.0, 0.0]]))
    5.0
    """
    from .neighbors import exact_kneighbors

    distances, _ = exact_kneighbors(X, centres, 1, device=device)
    return float(distances.max())


def merge_coresets(
    parts,
    n_selected: int,
    *,
    projection_dim: int | None = 128,
    random_state=None,
    method: str = "accelerated",
    device="cpu",
) -> tuple[np.ndarray, float]:
    """One greedy k-center pass over the union of coresets (composable coresets).

    The second step of a sharded coreset: each shard of the data keeps the
    greedy ``n_selected``-center coreset of its own rows (all its rows if it
    has fewer), and this pass selects ``n_selected`` rows from the union of
    those. ``random_state`` must be the one the shards projected with, so
    that both steps measure distances in one space.

    Parameters
    ----------
    parts : sequence of array-like of shape (n_i, n_features)
        The shards' coreset rows, in full features.
    n_selected : int
        Rows to keep, at most the union's size.
    projection_dim : int or None, default=128
        As :class:`ProjectedRows`; ``None`` selects on the features as they are.
    random_state : int, RandomState instance or None, default=None
        Seeds the projection (as the shards') and the first selected row.
    method : {"accelerated", "greedy"}, default="accelerated"
    device : str or torch.device, default="cpu"

    Returns
    -------
    indices : ndarray of shape (n_selected,), int64
        Selected rows of the concatenation of ``parts``, in selection order.
    radius : float
        Covering radius of the selection over the union, in the space it was
        selected in.

    Notes
    -----
    **Bound.** Let ``OPT`` be the smallest radius with which ``k =
    n_selected`` balls (centred anywhere) cover all the rows ``P``, in the
    selection space. A shard ``P_i`` is covered by the same balls, and greedy
    k-center is a 2-approximation (Gonzalez, 1985), so every row lies within
    ``r_i <= 2 OPT`` of its shard's coreset ``C_i``. The union ``U`` of the
    ``C_i`` is part of ``P``, so the greedy pass over it covers ``U`` within
    ``r_U <= 2 OPT``. By the triangle inequality every row lies within

        ``max_i r_i + r_U <= 4 OPT``

    of the final coreset: at most 4 times the optimum, and at most 4 times the
    radius of greedy on all rows at once (which is at least ``OPT``). The
    middle term is an a-posteriori bound: both radii are known once the passes
    have run. With one shard the pass returns the shard's own selection order,
    so the result is the single greedy selection.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore.coreset import merge_coresets
    >>> rows = np.random.RandomState(0).normal(size=(40, 8)).astype(np.float32)
    >>> indices, radius = merge_coresets([rows[:20], rows[20:]], 5, projection_dim=None, random_state=0)
    >>> indices.shape
    (5,)
    """
    parts = [np.asarray(part, dtype=np.float32) for part in parts]
    n_union = sum(len(part) for part in parts)
    if not 1 <= n_selected <= n_union:
        raise ValueError(f"n_selected must lie in [1, {n_union}], the union's size; got {n_selected}.")
    device = check_device(device)
    with _one_cpu_thread(device):
        stream = ProjectedRows(
            n_union, parts[0].shape[1], projection_dim=projection_dim, dtype="float32",
            random_state=random_state, device=device,
        )
        for part in parts:
            for rows in batches(len(part), _CHUNK_ROWS):
                stream.add(torch.from_numpy(part[rows]))
        return stream.select(n_selected=n_selected, method=method)


class GreedyCoresetSampler(TransformerMixin, BaseEstimator):
    """Greedy k-center coreset of the rows of a feature matrix (PatchCore).

    Selects ``max(1, ceil(coreset_ratio * n_samples))`` rows so that every row
    is as close as greedily possible to a selected one, on a Gaussian random
    projection of the features, as PatchCore builds its memory bank.

    Unlike most transformers, this one **subsamples rows**: ``transform``
    returns the selected rows of the training matrix, not a transformed copy
    of each row. A coreset is a property of the whole set (which rows
    represent the others), so it is chosen by ``fit`` and there is nothing to
    compute for new rows; ``transform`` accepts only the fitted matrix.

    Parameters
    ----------
    coreset_ratio : float in (0, 1], default=0.1
        Fraction of rows kept. The count is ``ceil(coreset_ratio * n_samples)``,
        at least 1, with the product rounded to 6 decimals first so that
        float noise (``0.7 * 10 = 7.000000000000001``) does not add a row.
        When that is every row (``1.0``), they are kept in their original
        order without any greedy work.
    projection_dim : int or None, default=128
        Dimension of the Gaussian random projection the distances are computed
        on (the paper's 128). ``None``, or a value not below ``n_features``,
        uses the features as they are.
    method : {"accelerated", "greedy"}, default="accelerated"
        ``"greedy"``: exact greedy k-center, one pass over the projected
        features per selected row. ``"accelerated"``: the same selection
        (identical indices), with most of the work skipped by lower bounds on
        the distances (see Notes).
    projection_dtype : {"float32", "float16", "bfloat16"}, default="float32"
        Storage of the projected copy. Half precision halves its memory;
        distances are still accumulated in float32, on the rounded features.
    random_state : int, RandomState instance or None, default=None
        Seeds the projection and the first selected row. An int gives
        bit-identical indices across runs.
    device : str or torch.device, default="cpu"
        Where the distances are computed.
    verbose : int, default=0
        Print the progress of the selection when positive.

    Attributes
    ----------
    indices_ : ndarray of shape (n_selected,), int64
        Selected rows, in selection order; the first is the random start.
    radius_ : float
        Coverage radius achieved in the space the selection ran in (projected
        unless no projection was used): the largest distance of a row to its
        nearest selected row. 0 when every row is kept.
    projection_ : GaussianRandomProjection or None
        The fitted projection, ``None`` when the features were used as they
        are or ``coreset_ratio=1``.
    n_features_in_ : int
        Number of features seen during fit.
    n_samples_fit_ : int
        Number of rows seen during fit.

    See Also
    --------
    k_center_greedy : The selection on a tensor, without projection.
    sklearn.random_projection.GaussianRandomProjection : The projection.

    Notes
    -----
    PatchCore (Roth et al., CVPR 2022, Sec. 3.2, Alg. 1) keeps a coreset
    ``M_C`` of the patch features chosen greedily: start from a random row,
    then repeatedly add the row farthest from the rows chosen so far,
    ``argmax_m min_n ||psi(m) - psi(n)||``, with ``psi`` a random projection
    (Johnson-Lindenstrauss). The distances only need to rank points roughly,
    so 128 dimensions do, far below what
    :func:`~sklearn.random_projection.johnson_lindenstrauss_min_dim` would ask
    to preserve every distance within a few percent.

    The projected features are centred and rotated onto their principal axes,
    which leaves every distance as it is (so ``radius_`` is the radius under
    ``projection_``) but makes the leading coordinates carry most of the
    spread (97 % in the first 32 of 128 on PatchCore features). Both methods
    select on this same copy.

    ``method="accelerated"`` selects the farthest rows in blocks, keeping the
    prefix that provably equals the next greedy picks, and updates a row only
    when two lower bounds of its distance to a new centre allow an
    improvement: the triangle inequality through the row's nearest centre,
    and the distance on the 16, then 32, leading axes. The distances it does
    compute are float32 sums of squared differences, exactly as ``"greedy"``
    computes them, so both give the same indices (checked on CPU; exact ties
    are broken the same way too). Memory stays within the projected copy plus a few vectors
    of length n_samples. Where the bounds keep most rows (the first centres,
    or data without low-dimensional structure such as i.i.d. noise) it makes
    plain passes instead, and runs close to ``"greedy"``'s speed.

    ``fit`` runs torch on one CPU thread (the caller's setting is restored
    afterwards): the selection is a chain of small dependent operations, and
    on a busy 2-core machine OpenMP synchronisation made it, and even the
    projection, 2 to 17 times slower with two threads.

    References
    ----------
    K. Roth, L. Pemula, J. Zepeda, B. Schoelkopf, T. Brox, P. Gehler,
    "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore import GreedyCoresetSampler
    >>> X = np.random.RandomState(0).normal(size=(1000, 64)).astype(np.float32)
    >>> sampler = GreedyCoresetSampler(coreset_ratio=0.05, random_state=0).fit(X)
    >>> sampler.indices_.shape
    (50,)
    >>> sampler.transform(X).shape
    (50, 64)
    """

    _parameter_constraints: dict = {
        "coreset_ratio": [Interval(Real, 0, 1, closed="right")],
        "projection_dim": [Interval(Integral, 1, None, closed="left"), None],
        "method": [StrOptions({"accelerated", "greedy"})],
        "projection_dtype": [StrOptions(set(_DTYPES))],
        "random_state": ["random_state"],
        "device": [str, torch.device],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        *,
        coreset_ratio=0.1,
        projection_dim=128,
        method="accelerated",
        projection_dtype="float32",
        random_state=None,
        device="cpu",
        verbose=0,
    ):
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.method = method
        self.projection_dtype = projection_dtype
        self.random_state = random_state
        self.device = device
        self.verbose = verbose

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Select the coreset rows of ``X``.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)
            Features, converted to float32.
        y : Ignored
            Not used, present for API consistency by convention.

        Returns
        -------
        self : object
            Fitted sampler.
        """
        X = validate_data(self, _to_numpy(X), dtype=np.float32)
        n_samples, n_features = X.shape
        self.n_samples_fit_ = n_samples
        device = check_device(self.device)
        if coreset_size(self.coreset_ratio, n_samples) == n_samples:
            self.indices_, self.radius_, self.projection_ = np.arange(n_samples), 0.0, None
            return self
        with _one_cpu_thread(device):
            stream = ProjectedRows(
                n_samples, n_features, projection_dim=self.projection_dim,
                dtype=self.projection_dtype, random_state=self.random_state, device=device,
            )
            # 1 MiB batches: the only copies of input rows that the projection makes.
            for rows in batches(n_samples, max(1, (1 << 18) // n_features)):
                stream.add(torch.from_numpy(X[rows]))
            self.indices_, self.radius_ = stream.select(
                self.coreset_ratio, method=self.method, verbose=self.verbose
            )
        self.projection_ = stream.projection_
        return self

    def transform(self, X):
        """Return the coreset rows of the fitted matrix.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples_fit_, n_features)
            The matrix passed to ``fit``; only its selected rows are read.

        Returns
        -------
        X_coreset : ndarray of shape (n_selected, n_features), float32
            ``X[indices_]``, in selection order.
        """
        check_is_fitted(self)
        X = validate_data(self, _to_numpy(X), dtype=np.float32, reset=False)
        if len(X) != self.n_samples_fit_:
            raise ValueError(
                f"GreedyCoresetSampler.transform returns rows of the matrix it was fitted on, "
                f"which had {self.n_samples_fit_} rows; got X with {len(X)} rows."
            )
        return X[self.indices_]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags


def _to_numpy(X):
    """Torch tensors cross the public boundary as numpy arrays (no copy on CPU)."""
    if isinstance(X, torch.Tensor):
        return X.detach().cpu().numpy()
    return X


class ProjectedRows:
    """The coreset's projected copy of feature rows, filled batch by batch.

    PatchCore selects its coreset on a Gaussian random projection of the
    patch features (Sec. 3.2). Projecting each batch as it comes lets a
    caller stream features from the network without ever holding all of
    them in float32: only this ``(n_samples, projection_dim)`` copy is kept.
    :class:`GreedyCoresetSampler` and the detector both select through it, so
    they draw the same projection and start row from the same ``random_state``.

    Parameters
    ----------
    n_samples, n_features : int
        Rows to come and their dimension.
    projection_dim : int or None
        As :class:`GreedyCoresetSampler`; ``None`` or a value not below
        ``n_features`` keeps the features as they are.
    dtype : {"float32", "float16", "bfloat16"}
        Storage of the projected copy.
    random_state : int, RandomState instance or None
        Seeds the projection, then the start row of :meth:`select`.
    device : torch.device
        Where the copy lives and the selection runs.

    Attributes
    ----------
    projection_ : GaussianRandomProjection or None
        The projection used; None without one.
    """

    def __init__(self, n_samples, n_features, *, projection_dim, dtype, random_state, device):
        self._rng = check_random_state(random_state)
        projection_seed = self._rng.randint(np.iinfo(np.int32).max)
        self.projection_ = None
        self._matrix = None
        if projection_dim is not None and projection_dim < n_features:
            # Only the number of features matters to fit the projection.
            self.projection_ = GaussianRandomProjection(
                projection_dim, random_state=projection_seed
            ).fit(np.zeros((1, n_features), dtype=np.float32))
            self._matrix = torch.tensor(self.projection_.components_.T, device=device)
        dim = n_features if self._matrix is None else projection_dim
        self.Z = torch.empty(n_samples, dim, dtype=_DTYPES[dtype], device=device)
        self._offset = None
        self._filled = 0

    def add(self, rows: torch.Tensor) -> None:
        """Project the next ``(m, n_features)`` rows, in order."""
        rows = rows.to(self.Z.device, torch.float32)
        if self._offset is None:
            # Shifting by the first batch's mean keeps the stored values near 0,
            # where half precision is finest; the exact centring comes in select.
            self._offset = rows.mean(0, dtype=torch.float64).float()
        stop = self._filled + len(rows)
        rows = rows - self._offset
        self.Z[self._filled : stop] = rows if self._matrix is None else rows @ self._matrix
        self._filled = stop

    def select(
        self,
        coreset_ratio: float | None = None,
        *,
        n_selected: int | None = None,
        initial=None,
        method: str = "accelerated",
        verbose: int = 0,
    ):
        """Greedy k-center selection on the rows added (all of them must be).

        Parameters
        ----------
        coreset_ratio : float in (0, 1], default=None
            Fraction of the rows to select, counted by :func:`coreset_size`.
        n_selected : int, default=None
            Number of rows to select instead of ``coreset_ratio`` (exactly one
            of the two is given).
        initial : array-like of int, default=None
            Rows selected already: the selection starts with them, in this
            order, and continues greedily (see :func:`k_center_greedy`).
            None starts from a seeded random row.
        method : {"accelerated", "greedy"}, default="accelerated"
        verbose : int, default=0

        Returns
        -------
        indices : ndarray of shape (n_selected,), int64
            Selected rows, in selection order (``initial`` first).
        radius : float
            Coverage radius in the projected space; 0 when every row is kept.
        """
        n_samples = len(self.Z)
        if self._filled != n_samples:
            raise ValueError(f"{self._filled} rows were added, {n_samples} were announced.")
        if (coreset_ratio is None) == (n_selected is None):
            raise ValueError("Give exactly one of coreset_ratio and n_selected.")
        start = int(self._rng.randint(n_samples))
        if n_selected is None:
            n_selected = coreset_size(coreset_ratio, n_samples)
        if initial is not None:
            start = np.asarray(initial, dtype=np.int64)
        if n_selected == n_samples:
            if initial is None:
                return np.arange(n_samples, dtype=np.int64), 0.0
            rest = np.setdiff1d(np.arange(n_samples), start, assume_unique=True)
            return np.concatenate([start, rest]), 0.0
        _centre_and_rotate(self.Z)
        indices, radius = k_center_greedy(self.Z, n_selected, start, method=method, verbose=verbose)
        return indices.cpu().numpy(), radius


def _centre_and_rotate(Z: torch.Tensor) -> None:
    """Centre the rows of ``Z`` in place and, when small enough, rotate them onto
    their principal axes: distances stay as they are, and the leading columns
    then carry most of the spread, which the accelerated selection uses as a
    lower bound."""
    mean = torch.zeros(Z.shape[1], dtype=torch.float64, device=Z.device)
    for b in batches(len(Z), _CHUNK_ROWS):
        mean += Z[b].sum(0, dtype=torch.float64)
    mean = (mean / len(Z)).float()
    for b in batches(len(Z), _CHUNK_ROWS):
        Z[b] = Z[b].float().sub_(mean)
    if Z.shape[1] <= _MAX_ROTATED_DIM:
        _rotate_to_principal_axes(Z)


def _rotate_to_principal_axes(Z: torch.Tensor) -> None:
    """Rotate the centred rows of ``Z`` in place onto its principal axes, largest first."""
    scratch = _scratch(Z)
    gram = torch.zeros(Z.shape[1], Z.shape[1], device=Z.device)
    for b in batches(len(Z), _CHUNK_ROWS):
        rows = scratch[: b.stop - b.start].copy_(Z[b])
        gram.addmm_(rows.T, rows)
    # eigh in float64 keeps the axes orthonormal whatever the rounding of the Gram matrix.
    axes = torch.linalg.eigh(gram.double()).eigenvectors.flip(1).float()
    rotated = torch.empty_like(scratch)
    for b in batches(len(Z), _CHUNK_ROWS):
        m = b.stop - b.start
        Z[b] = torch.mm(scratch[:m].copy_(Z[b]), axes, out=rotated[:m])
