"""Exact and pynndescent nearest-neighbour search of the memory bank."""

import pickle

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors
from sklearn.utils._param_validation import InvalidParameterError

from skpatchcore import neighbors
from skpatchcore.neighbors import NearestNeighborIndex, exact_kneighbors
from skpatchcore.scoring import image_scores, max_patches


@pytest.fixture(scope="module")
def data():
    rng = np.random.RandomState(0)
    bank = rng.normal(size=(300, 16)).astype(np.float32)
    queries = rng.normal(size=(120, 16)).astype(np.float32)
    return bank, queries


@pytest.fixture(scope="module")
def clusters():
    """Gaussian clusters of low intrinsic dimension, like patch features: bank and queries."""
    rng = np.random.RandomState(0)
    centers = rng.normal(scale=10.0, size=(20, 32))
    spans = rng.normal(size=(20, 4, 32))  # each cluster lies near a 4-D subspace
    labels = rng.randint(20, size=3000)
    latent = rng.normal(size=(3000, 1, 4))
    points = centers[labels] + (latent @ spans[labels])[:, 0] + 0.05 * rng.normal(size=(3000, 32))
    return points[:2500].astype(np.float32), points[2500:].astype(np.float32)


@pytest.fixture(scope="module")
def approximate_index(clusters):
    # Building compiles pynndescent's numba graph construction (tens of seconds,
    # not cached on disk by pynndescent): one index for the whole module.
    bank, _ = clusters
    return NearestNeighborIndex("pynndescent", random_state=0).fit(bank)


@pytest.mark.parametrize("n_neighbors", [1, 5])
def test_exact_matches_sklearn_brute_force(data, n_neighbors):
    bank, queries = data
    dist, idx = exact_kneighbors(queries, bank, n_neighbors)
    want_dist, want_idx = (
        NearestNeighbors(n_neighbors=n_neighbors, algorithm="brute").fit(bank).kneighbors(queries)
    )
    assert dist.dtype == np.float32 and idx.dtype == np.int64
    assert dist.shape == idx.shape == (len(queries), n_neighbors)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(dist, want_dist, rtol=1e-5, atol=1e-5)


def test_exact_distances_of_duplicates_are_clipped_at_zero():
    # Large norms make ||a||² - 2ab + ||b||² cancel badly; the result must not go negative.
    rng = np.random.RandomState(0)
    bank = (100.0 + rng.normal(size=(50, 32))).astype(np.float32)
    dist, _ = exact_kneighbors(bank, bank, 1)
    assert np.all(dist >= 0)  # no NaN from the square root of a negative either
    # float32 rounding of the expansion: at most ~5e-4 of the norm near zero.
    assert np.all(dist[:, 0] <= 5e-4 * np.linalg.norm(bank, axis=1))


@pytest.mark.parametrize("n_queries", [5, 120])  # both layouts of the product
def test_exact_nearest_is_the_first_of_equal_bank_rows(data, n_queries):
    bank, queries = data
    queries = queries[:n_queries]
    # Every row three times, copies after the originals: the originals must win.
    tripled = np.concatenate([bank, bank, bank])
    dist, idx = exact_kneighbors(queries, tripled, 1)
    want_dist, want_idx = exact_kneighbors(queries, bank, 1)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(dist, want_dist, rtol=1e-6)
    assert torch.equal(neighbors._argmin_rows(torch.tensor([[2.0, 1.0, 1.0], [0.0, 0.0, 3.0]])), torch.tensor([[1], [0]]))


@pytest.mark.parametrize("n_queries", [5, 120])  # both layouts of the product
def test_groups_exclude_bank_entries_of_the_same_group(data, n_queries):
    bank, queries = data
    queries = queries[:n_queries]
    rng = np.random.RandomState(1)
    query_groups = rng.randint(4, size=len(queries))
    bank_groups = rng.randint(4, size=len(bank))
    dist, idx = exact_kneighbors(
        queries, bank, 3, query_groups=query_groups, bank_groups=bank_groups
    )
    full = np.linalg.norm(queries[:, None, :] - bank[None, :, :], axis=2)
    full[query_groups[:, None] == bank_groups[None, :]] = np.inf
    want_idx = np.argsort(full, axis=1)[:, :3]
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(dist, np.take_along_axis(full, want_idx, axis=1), rtol=1e-5)
    assert not np.any(query_groups[:, None] == bank_groups[idx])


def test_tiny_working_memory_gives_the_same_neighbors(data):
    bank, queries = data
    # 0.01 MiB holds about 4 rows of 300 distances: many chunks.
    chunked = exact_kneighbors(queries, bank, 4, working_memory=0.01)
    whole = exact_kneighbors(queries, bank, 4)
    np.testing.assert_array_equal(chunked[1], whole[1])
    # Small chunks take the other layout of the product: float32 rounding may differ.
    np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-6)


def test_exact_accepts_torch_tensors_and_precomputed_norms(data):
    bank, queries = data
    norms = (bank.astype(np.float64) ** 2).sum(axis=1)
    dist, idx = exact_kneighbors(torch.from_numpy(queries), torch.from_numpy(bank), 2, bank_sq_norms=norms)
    want_dist, want_idx = exact_kneighbors(queries, bank, 2)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(dist, want_dist, rtol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_cuda_is_a_clear_error(data):
    bank, queries = data
    with pytest.raises(ValueError, match="CUDA is not available"):
        exact_kneighbors(queries, bank, device="cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        NearestNeighborIndex("exact", device="cuda").fit(bank)


def test_auto_resolves_to_exact_for_a_small_bank(data):
    bank, queries = data
    index = NearestNeighborIndex().fit(bank)
    assert index.algorithm_ == "exact" and index.index_ is None
    assert index.n_samples_fit_ == 300 and index.n_features_in_ == 16
    assert index.bank_.flags.c_contiguous and index.bank_.dtype == np.float32
    np.testing.assert_allclose(index.bank_sq_norms_, (bank**2).sum(axis=1), rtol=1e-5)
    dist, idx = index.kneighbors(queries, 2)
    want_dist, want_idx = exact_kneighbors(queries, bank, 2)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(dist, want_dist)


def test_fit_copies_the_bank(data):
    bank, _ = data
    bank = bank.copy()
    index = NearestNeighborIndex("exact").fit(bank)
    bank[:] = 0.0
    assert np.any(index.bank_ != 0.0)


def test_pynndescent_recall_on_gaussian_clusters(approximate_index, clusters):
    bank, queries = clusters
    assert approximate_index.algorithm_ == "pynndescent"
    dist, idx = approximate_index.kneighbors(queries, 1)
    _, want_idx = exact_kneighbors(queries, bank, 1)
    assert dist.dtype == np.float32 and idx.dtype == np.int64
    assert np.mean(idx[:, 0] == want_idx[:, 0]) >= 0.9
    # Whatever it returns is a real bank entry at the distance it reports.
    np.testing.assert_allclose(dist[:, 0], np.linalg.norm(queries - bank[idx[:, 0]], axis=1), rtol=1e-4)


def test_pynndescent_exact_flag_bypasses_the_graph(approximate_index, clusters):
    bank, queries = clusters
    dist, idx = approximate_index.kneighbors(queries, 9, exact=True)
    want_dist, want_idx = exact_kneighbors(queries, bank, 9)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(dist, want_dist)


def test_pynndescent_rows_it_leaves_short_are_searched_exactly(approximate_index, clusters, monkeypatch):
    _, queries = clusters
    query = approximate_index.index_.query

    def short_of_neighbors(X, k, epsilon):
        # What pynndescent returns when the graph search finds fewer than k.
        indices, distances = query(X, k=k, epsilon=epsilon)
        indices[0, -1], distances[0, -1] = -1, np.inf
        return indices, distances

    monkeypatch.setattr(approximate_index.index_, "query", short_of_neighbors)
    dist, idx = approximate_index.kneighbors(queries[:5], 3)
    want_dist, want_idx = approximate_index.kneighbors(queries[:1], 3, exact=True)
    np.testing.assert_array_equal(idx[0], want_idx[0])
    np.testing.assert_array_equal(dist[0], want_dist[0])
    assert np.all(np.isfinite(dist))


def test_pynndescent_parallel_queries_match_serial_ones(approximate_index, clusters):
    import numba

    bank, queries = clusters
    parallel = NearestNeighborIndex("pynndescent", random_state=0, n_jobs=2).fit(bank)
    assert parallel.index_.parallel_batch_queries
    assert not approximate_index.index_.parallel_batch_queries
    threads = numba.get_num_threads()
    dist, idx = parallel.kneighbors(queries, 3)
    assert numba.get_num_threads() == threads  # restored after the query
    want_dist, want_idx = approximate_index.kneighbors(queries, 3)
    # Same seed, same graph: the threads split the queries, not the search.
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(dist, want_dist)


def test_nearest_within_bounds_is_exact(monkeypatch):
    # 100 dims, more than the 64 principal axes kept: the bounds prune, inexactly.
    rng = np.random.RandomState(0)
    latent = rng.normal(size=(2600, 10)) @ rng.normal(size=(10, 100))
    points = (latent + 0.3 * rng.normal(size=(2600, 100))).astype(np.float32)
    bank, queries = points[:2000], points[2000:]
    index = NearestNeighborIndex("pynndescent", random_state=0).fit(bank)
    assert index.principal_axes_.shape == (100, 64)
    want_dist, want_idx = exact_kneighbors(queries, bank, 1)
    approx_dist, _ = index.kneighbors(queries, 1)
    true_dist = np.linalg.norm(queries.astype(np.float64) - bank[want_idx[:, 0]], axis=1)
    full_passes = []
    exact = index._exact
    monkeypatch.setattr(index, "_exact", lambda X, k: full_passes.append(len(X)) or exact(X, k))
    for bounds in (approx_dist[:, 0], true_dist, 1.5 * approx_dist[:, 0]):
        dist, idx = index.nearest_within(queries, bounds)
        np.testing.assert_array_equal(idx, want_idx)
        np.testing.assert_allclose(dist[:, 0], true_dist, rtol=1e-3)
    assert full_passes == []  # the bounds pruned: no exact pass over the whole bank
    # Bounds that prune nothing: the plain exact search.
    dist, idx = index.nearest_within(queries, np.full(600, 1e9))
    np.testing.assert_array_equal(idx, want_idx)
    assert full_passes == [600]
    with pytest.raises(ValueError, match="one per query"):
        index.nearest_within(queries, bounds[:5])


def test_image_scores_do_not_depend_on_the_backend(approximate_index, clusters):
    bank, queries = clusters
    images = queries[:480].reshape(5, 96, -1)  # 5 "images" of 96 patches
    exact = NearestNeighborIndex("exact").fit(bank)
    want, want_dist = image_scores(exact, images, 9)
    got, got_dist = image_scores(approximate_index, images, 9)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Patch distances only over-estimate (up to the exact search's float32 rounding).
    assert np.all(got_dist >= want_dist * (1 - 1e-3))


@pytest.mark.parametrize("grid", [None, (10, 13)])
@pytest.mark.parametrize("cell_copy", [True, False])
@pytest.mark.parametrize("more_cells", [False, True])
@pytest.mark.parametrize("order", ["greedy", "shuffled"])
def test_largest_nearest_is_the_exact_maximum(clusters, order, more_cells, cell_copy, grid, monkeypatch):
    from skpatchcore.coreset import k_center_greedy

    bank, queries = clusters
    if more_cells:  # the second round (more cells, raised floors) even for a few queries
        monkeypatch.setattr(neighbors, "_MORE_CELLS_MIN_WORK", 0)
    if not cell_copy:  # a bank too large to copy in cell order: cells gathered per search
        monkeypatch.setattr(neighbors, "_CELL_BLOCKS_MAX_BYTES", 0)
    if order == "greedy":  # the order of a coreset bank, outliers first: no matter for the cells
        bank = bank[k_center_greedy(torch.from_numpy(bank), len(bank), 0)[0].numpy()]
    index = NearestNeighborIndex("exact").fit(bank)
    assert (index.cell_blocks_ is not None) == cell_copy
    images = np.concatenate([queries, bank[:20] + 0.01]).reshape(4, 130, -1)
    dist, idx = index.kneighbors(images.reshape(-1, images.shape[-1]), 1)
    want = max_patches(dist[:, 0].reshape(4, 130), idx[:, 0].reshape(4, 130))
    got = index.largest_nearest(images, grid=grid)  # a grid of unrelated patches: loose seeds' bounds
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    assert got[0].dtype == np.float32 and got[1].dtype == got[2].dtype == np.int64


@pytest.mark.parametrize("grid", [(8, 10), (9, 11)])
def test_largest_nearest_of_patch_grids_starts_from_neighbouring_patches(clusters, grid, monkeypatch):
    # Patches that share their nearest row with their 2 x 2 block, as neighbouring
    # patch features mostly do, and one far away per image: only the seeds (a
    # quarter) meet the cell centres, their rows bound every other patch, and no
    # patch needs more cells.
    bank, _ = clusters
    rng = np.random.default_rng(0)
    h, w = grid
    index = NearestNeighborIndex("exact", random_state=0).fit(bank)
    blocks = bank[rng.choice(len(bank), (2, (h + 1) // 2, (w + 1) // 2))]
    images = blocks.repeat(2, axis=1).repeat(2, axis=2)[:, :h, :w] + 1e-3 * rng.normal(size=(2, h, w, bank.shape[1]))
    images = images.reshape(2, h * w, -1).astype(np.float32)
    images[0, 5] += 50.0
    images[1, 3 * w + 7] += 100.0
    compared, centred = [], []
    cell_bounds_sq, centre_products = index._cell_bounds_sq, index._centre_products
    monkeypatch.setattr(index, "_cell_bounds_sq", lambda X, *a: compared.append(len(X)) or cell_bounds_sq(X, *a))
    monkeypatch.setattr(index, "_centre_products", lambda X: centred.append(len(X)) or centre_products(X))
    got = index.largest_nearest(images, grid=grid)
    dist, idx = index.kneighbors(images.reshape(2 * h * w, -1), 1)
    want = max_patches(dist[:, 0].reshape(2, h * w), idx[:, 0].reshape(2, h * w))
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    assert list(got[1]) == [5, 3 * w + 7] and compared == []
    assert centred == [2 * ((h + 1) // 2) * ((w + 1) // 2)]
    with pytest.raises(ValueError, match="does not hold"):
        index.largest_nearest(images, grid=(h, w + 1))


def test_largest_nearest_bounds_are_upper_bounds_and_mostly_exact(clusters):
    bank, queries = clusters
    index = NearestNeighborIndex("exact").fit(bank)
    images = queries[:480].reshape(4, 120, -1)
    *found, bounds = index.largest_nearest(images, return_bounds=True)
    for got, want in zip(found, index.largest_nearest(images)):
        np.testing.assert_array_equal(got, want)
    exact = index.kneighbors(images.reshape(480, -1))[0][:, 0].reshape(4, 120)
    # float32 rounding of the expansion: squared distances off by 1e-6 (|x|² + |b|²)
    tolerance = np.sqrt(1e-6 * ((images**2).sum(-1).max() + (bank**2).sum(1).max()))
    assert bounds.shape == (4, 120) and np.all(bounds >= exact - tolerance)
    assert np.mean(np.isclose(bounds, exact, rtol=1e-5)) > 0.5
    np.testing.assert_allclose(bounds[np.arange(4), found[1]], found[0], rtol=1e-6)


def test_largest_nearest_bounds_its_buffers_by_working_memory(clusters):
    bank, queries = clusters
    images = queries[:480].reshape(4, 120, -1)
    want = NearestNeighborIndex("exact").fit(bank).largest_nearest(images)
    small = NearestNeighborIndex("exact", working_memory=0.05).fit(bank)  # a few queries per chunk
    got = small.largest_nearest(images)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)  # searched in other chunks: other rounding


@pytest.mark.parametrize("cell_copy", [True, False])
@pytest.mark.parametrize("more_cells", [False, True])
def test_largest_nearest_skips_rows_of_the_same_group(clusters, more_cells, cell_copy, monkeypatch):

    bank, queries = clusters
    if not cell_copy:
        monkeypatch.setattr(neighbors, "_CELL_BLOCKS_MAX_BYTES", 0)
    index = NearestNeighborIndex("exact").fit(bank)
    if more_cells:
        monkeypatch.setattr(neighbors, "_MORE_CELLS_MIN_WORK", 0)
    bank_groups = np.arange(len(bank)) % 5
    images = np.concatenate([queries[:300], bank[:90] + 0.01]).reshape(3, 130, -1)  # near their own rows
    groups = np.array([0, 3, 4])
    dist, idx = exact_kneighbors(
        images.reshape(-1, images.shape[-1]), bank, 1,
        query_groups=np.repeat(groups, 130), bank_groups=bank_groups,
    )
    want = max_patches(dist[:, 0].reshape(3, 130), idx[:, 0].reshape(3, 130))
    got = index.largest_nearest(images, groups=groups, bank_groups=bank_groups)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    assert np.all(bank_groups[got[2]] != groups)
    with pytest.raises(ValueError, match="together"):
        index.largest_nearest(images, groups=groups)


def test_largest_nearest_searches_few_queries_in_full(clusters, monkeypatch):
    bank, queries = clusters
    index = NearestNeighborIndex("exact").fit(bank)
    rows_searched = []
    search = neighbors._search
    monkeypatch.setattr(
        neighbors, "_search", lambda X, B, *a: rows_searched.append(len(X) * len(B)) or search(X, B, *a)
    )
    index.largest_nearest(queries[:480].reshape(4, 120, -1))
    assert sum(rows_searched) < 0.5 * 480 * len(bank)  # pruned, yet exact (test above)


@pytest.mark.parametrize("grouped", [False, True])
def test_largest_nearest_searches_a_small_bank_in_one_pass(clusters, grouped, monkeypatch):

    bank, queries = clusters
    bank = bank[: neighbors._FULL_SEARCH_MAX_ROWS]
    index = NearestNeighborIndex("exact").fit(bank)
    images = queries[:480].reshape(4, 120, -1)
    groups, bank_groups = (np.arange(4), np.arange(len(bank)) % 4) if grouped else (None, None)
    dist, idx = exact_kneighbors(
        images.reshape(480, -1), bank, 1, bank_groups=bank_groups,
        query_groups=None if groups is None else np.repeat(groups, 120),
    )
    want = max_patches(dist[:, 0].reshape(4, 120), idx[:, 0].reshape(4, 120))
    searches = []
    search = neighbors._search
    monkeypatch.setattr(neighbors, "_search", lambda X, B, *a: searches.append((len(X), len(B))) or search(X, B, *a))
    monkeypatch.setattr(index, "_cell_bounds_sq", None)  # the cells are not used
    *got, bounds = index.largest_nearest(images, groups=groups, bank_groups=bank_groups, return_bounds=True)
    assert searches == [(480, len(bank))]
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    np.testing.assert_allclose(bounds, dist[:, 0].reshape(4, 120), rtol=1e-6)


def test_bank_cells_partition_the_bank_by_nearest_centre(clusters):
    bank, _ = clusters
    index = NearestNeighborIndex("exact", random_state=0).fit(bank)
    centres, order, bounds = index.cell_centres_, index.cell_order_, index.cell_bounds_
    n_cells = len(bounds) - 1
    assert centres.shape == (n_cells, bank.shape[1]) and centres.dtype == np.float32
    assert 0.8 * np.sqrt(2 * len(bank)) <= n_cells <= round(np.sqrt(2 * len(bank)))
    np.testing.assert_array_equal(np.sort(order), np.arange(len(bank)))
    assert bounds[0] == 0 and bounds[-1] == len(bank) and np.all(np.diff(bounds) > 0)  # none empty
    centre_dist = np.linalg.norm(bank[:, None] - centres[None], axis=2)
    for c in range(n_cells):
        rows = order[bounds[c] : bounds[c + 1]]
        assert np.all(centre_dist[rows, c] <= centre_dist[rows].min(axis=1) + 1e-4)
    # Seeded: the same cells again.
    again = NearestNeighborIndex("exact", random_state=0).fit(bank)
    np.testing.assert_array_equal(again.cell_centres_, centres)


def test_bank_cells_are_centred_on_bank_rows(clusters):
    # Rows, so that the distance to a centre bounds a query's nearest distance.
    bank, _ = clusters
    index = NearestNeighborIndex("exact", random_state=0).fit(bank)
    rows = index.cell_centre_rows_
    assert rows.dtype == np.int64 and len(np.unique(rows)) == len(rows) == len(index.cell_bounds_) - 1
    np.testing.assert_array_equal(index.cell_centres_, bank[rows])


def test_largest_nearest_compares_few_queries_with_the_cells(clusters, monkeypatch):
    bank, queries = clusters
    index = NearestNeighborIndex("exact", random_state=0).fit(bank)  # 86-136 of 480 over seeds 0-19
    compared = []
    cell_bounds_sq = index._cell_bounds_sq
    monkeypatch.setattr(index, "_cell_bounds_sq", lambda X, *a: compared.append(len(X)) or cell_bounds_sq(X, *a))
    index.largest_nearest(queries[:480].reshape(4, 120, -1))
    assert sum(compared) < 0.5 * 480  # the centre rows ruled out the rest (exact: tests above)
    # Queries on bank rows but one far away: the first floor rules out all the others.
    compared.clear()
    images = np.concatenate([bank[:119], bank[:1] + 100.0]).reshape(1, 120, -1)
    dist, position, _ = index.largest_nearest(images)
    assert position[0] == 119 and compared == []
    np.testing.assert_allclose(dist, index.kneighbors(images[0, 119:])[0][:, 0], rtol=1e-5)


def test_largest_nearest_skips_centre_rows_of_the_same_group(clusters):
    # A query on a centre row of its own group must not be bounded by that row:
    # copies of the centre rows, the others on rows of other groups (distance ~0).

    bank, _ = clusters
    index = NearestNeighborIndex("exact", random_state=0).fit(bank)
    centres = index.cell_centre_rows_[:60]
    bank_groups = np.ones(len(bank), dtype=np.int64)
    bank_groups[centres] = 0
    others = np.setdiff1d(np.arange(len(bank)), index.cell_centre_rows_)[:60]
    images = np.concatenate([bank[centres], bank[others] + 1e-3])[None]
    dist, idx = exact_kneighbors(images[0], bank, 1, query_groups=np.zeros(120, dtype=int), bank_groups=bank_groups)
    want = max_patches(dist[:, 0][None], idx[:, 0][None])
    got = index.largest_nearest(images, groups=[0], bank_groups=bank_groups)
    assert want[1][0] < 60  # the answer is a copy of a centre row
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2])


def test_bank_cells_split_the_dense_rows_of_a_coreset_bank():
    # A coreset's first picks are its outliers: cells around them left the dense
    # bulk, where queries fall, in one or two cells (2,098 rows per query here).
    from skpatchcore.coreset import k_center_greedy

    rng = np.random.RandomState(0)
    bank = np.concatenate([rng.normal(size=(2000, 16)), rng.normal(scale=6.0, size=(200, 16))]).astype(np.float32)
    bank = bank[k_center_greedy(torch.from_numpy(bank), len(bank), 0)[0].numpy()]
    index = NearestNeighborIndex("exact", random_state=0).fit(bank)
    queries = rng.normal(size=(300, 16)).astype(np.float32)
    sizes = np.diff(index.cell_bounds_)
    nearest_two = np.argsort(np.linalg.norm(queries[:, None] - index.cell_centres_[None], axis=2), axis=1)[:, :2]
    assert sizes[nearest_two].sum(axis=1).mean() <= 4 * 2 * len(bank) / len(sizes)


def test_bank_cells_of_duplicate_rows_are_not_empty():
    bank = np.repeat(np.eye(3, 8, dtype=np.float32), 40, axis=0)  # 3 distinct rows, 120 in all
    index = NearestNeighborIndex("exact", random_state=0).fit(bank)
    assert len(index.cell_centres_) <= 3 and np.all(np.diff(index.cell_bounds_) > 0)
    images = np.eye(3, 8, dtype=np.float32)[[0, 1, 2, 2]].reshape(2, 2, 8) + 0.5
    dist, idx = index.kneighbors(images.reshape(-1, 8), 1)
    np.testing.assert_allclose(index.largest_nearest(images)[0], dist[:, 0].reshape(2, 2).max(1), rtol=1e-5)


@pytest.mark.parametrize("pickled", ["before the centres", "with k-means centres"])
def test_largest_nearest_of_an_index_pickled_by_an_earlier_version(clusters, pickled):
    bank, queries = clusters
    index = NearestNeighborIndex("exact").fit(bank)
    images = queries[:480].reshape(4, 120, -1)
    want = index.largest_nearest(images)
    state = index.__getstate__()
    del state["cell_centre_rows_"]
    if pickled == "before the centres":  # no cell_centres_: cells around the bank's first rows
        n_cells = round(np.sqrt(2 * len(bank)))
        cell = np.linalg.norm(bank[:, None] - bank[None, :n_cells], axis=2).argmin(axis=1)
        del state["cell_centres_"]
        state["cell_order_"] = np.argsort(cell, kind="stable")
        state["cell_bounds_"] = np.r_[0, np.cumsum(np.bincount(cell, minlength=n_cells))]
        state["cell_blocks_"] = None
    else:
        # Centres that are not bank rows bound nothing. Here they sit on the
        # queries farthest from the bank, which a zero bound would rule out.
        farthest = np.argsort(-index.kneighbors(queries[:480])[0][:, 0])[: len(index.cell_centres_)]
        state["cell_centres_"] = queries[farthest]
    old = NearestNeighborIndex.__new__(NearestNeighborIndex)
    old.__setstate__(state)
    got = old.largest_nearest(images)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)


def test_image_scores_without_patch_distances_are_the_same(approximate_index, clusters):
    bank, queries = clusters
    images = queries[:480].reshape(5, 96, -1)
    for index in (NearestNeighborIndex("exact").fit(bank), approximate_index):
        want, _ = image_scores(index, images, 9)
        got, dist = image_scores(index, images, 9, patch_distances=False)
        assert dist is None
        np.testing.assert_array_equal(got, want)


def test_pynndescent_auto_picks_the_graph_when_many_queries_are_expected(clusters, monkeypatch):
    bank, _ = clusters
    monkeypatch.setattr(neighbors, "_PYNNDESCENT_COMPILE_S", 0.0)
    monkeypatch.setattr(neighbors, "_PYNNDESCENT_QUERY_S", 0.0)
    index = NearestNeighborIndex(expected_n_queries=10**9, random_state=0).fit(bank)
    assert index.algorithm_ == "pynndescent" and index.index_ is not None


@pytest.mark.parametrize(
    "n_samples, n_features, n_queries, want",
    [
        (10_240, 152, 102_400, False),  # 100 Lite0 training images: no minute of JIT
        (102_400, 152, 1_024_000, True),  # 1,000 of them: the graph pays for itself
        (102_400, 152, 1_024, False),  # ... unless hardly anything is queried
        (2_000, 1536, 10**9, True),  # any bank, queried long enough
        (500, 16, 10**9, False),  # exact search faster than a graph query
    ],
)
def test_auto_cost_model_weighs_build_time_against_queries(n_samples, n_features, n_queries, want):
    assert neighbors.pynndescent_pays_off(
        n_samples, n_features, n_queries, n_threads=2, device=torch.device("cpu")
    ) is want


def test_auto_cost_model_keeps_exact_search_on_a_gpu():
    assert not neighbors.pynndescent_pays_off(
        10**6, 1536, 10**9, n_threads=2, device=torch.device("cuda")
    )


def test_more_threads_make_exact_search_win_longer():
    args = (50_000, 152, 200_000)
    assert neighbors.pynndescent_pays_off(*args, n_threads=1, device=torch.device("cpu"))
    assert not neighbors.pynndescent_pays_off(*args, n_threads=16, device=torch.device("cpu"))


def test_pynndescent_pickle_round_trip_reuses_the_index(approximate_index, clusters, monkeypatch):
    import pynndescent

    _, queries = clusters
    blob = pickle.dumps(approximate_index)
    # Loading and querying must neither rebuild the graph nor re-prepare the index.
    for method in ("__init__", "prepare", "_init_search_graph"):
        monkeypatch.setattr(pynndescent.NNDescent, method, _must_not_be_called)
    loaded = pickle.loads(blob)
    graph, loaded_graph = approximate_index.index_._search_graph, loaded.index_._search_graph
    np.testing.assert_array_equal(loaded_graph.indptr, graph.indptr)
    np.testing.assert_array_equal(loaded_graph.indices, graph.indices)
    for got, want in zip(loaded.kneighbors(queries, 3), approximate_index.kneighbors(queries, 3)):
        np.testing.assert_array_equal(got, want)


def _must_not_be_called(*args, **kwargs):
    raise AssertionError("the pynndescent index was rebuilt")


@pytest.mark.parametrize(
    "make_query, message",
    [
        (lambda q: q[:, :5], "features"),
        (lambda q: np.where(np.eye(len(q), q.shape[1]) > 0, np.nan, q), "NaN"),
        (lambda q: q[0], "2D array"),
    ],
    ids=["dim-mismatch", "nan", "1d"],
)
def test_invalid_queries_are_rejected(data, make_query, message):
    bank, queries = data
    bad = make_query(queries)
    with pytest.raises(ValueError, match=message):
        NearestNeighborIndex("exact").fit(bank).kneighbors(bad)
    with pytest.raises(ValueError, match=message):
        exact_kneighbors(bad, bank)


def test_nan_in_the_bank_is_rejected(data):
    bank, _ = data
    bad = bank.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        NearestNeighborIndex("exact").fit(bad)
    with pytest.raises(ValueError, match="NaN"):
        exact_kneighbors(bank, torch.from_numpy(bad))


def test_more_neighbors_than_bank_entries_is_rejected(data):
    bank, queries = data
    with pytest.raises(ValueError, match="larger than the 300 bank samples"):
        NearestNeighborIndex("exact").fit(bank).kneighbors(queries, 301)
    with pytest.raises(ValueError, match="larger than the 300 bank samples"):
        exact_kneighbors(queries, bank, 301)


def test_groups_leaving_too_few_candidates_are_rejected():
    bank = np.zeros((4, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="only 1 bank samples"):
        exact_kneighbors(bank[:1], bank, 2, query_groups=[0], bank_groups=[0, 0, 0, 1])
    with pytest.raises(ValueError, match="given together"):
        exact_kneighbors(bank[:1], bank, query_groups=[0])


def test_invalid_parameters_are_rejected(data):
    bank, _ = data
    with pytest.raises(InvalidParameterError):
        NearestNeighborIndex("kd_tree").fit(bank)
    with pytest.raises(InvalidParameterError):
        exact_kneighbors(bank, bank, 0)
    with pytest.raises(ValueError, match="more bank samples than n_graph_neighbors"):
        NearestNeighborIndex("pynndescent", n_graph_neighbors=30).fit(bank[:20])
