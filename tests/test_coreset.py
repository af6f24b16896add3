"""Greedy k-center coreset subsampling (PatchCore Sec. 3.2)."""

import itertools

import numpy as np
import pytest
import torch
from sklearn.utils._param_validation import InvalidParameterError

from skpatchcore import coreset
from skpatchcore.coreset import (
    GreedyCoresetSampler,
    ProjectedRows,
    _plain_greedy,
    covering_radius,
    k_center_greedy,
    merge_coresets,
)


@pytest.fixture(autouse=True)
def accelerated_even_when_small(monkeypatch):
    """Exercise the accelerated method on these small sets, which it would run plainly."""
    monkeypatch.setattr(coreset, "_PLAIN_MAX_WORK", 0)


@pytest.fixture(scope="module")
def gaussian():
    return np.random.RandomState(0).normal(size=(2000, 160)).astype(np.float32)


@pytest.fixture(scope="module")
def clusters():
    """Far-apart clusters of low intrinsic dimension, like patch features (exact ties happen)."""
    rng = np.random.RandomState(1)
    centers = rng.normal(scale=10.0, size=(30, 48))
    spans = rng.normal(size=(30, 4, 48))
    labels = rng.randint(30, size=4000)
    latent = rng.normal(size=(4000, 1, 4))
    points = centers[labels] + (latent @ spans[labels])[:, 0] + 0.05 * rng.normal(size=(4000, 48))
    return points.astype(np.float32)


def coverage_radius(X, indices):
    """Largest distance of a row of X to its nearest selected row, by brute force."""
    d = np.sqrt(((X[:, None, :] - X[indices][None, :, :]) ** 2).sum(-1))
    return d.min(1).max()


def brute_force_greedy(X, n_centers, start):
    """Farthest-first traversal on the full distance matrix."""
    d = np.sqrt(((X[:, None, :] - X[None, :, :]) ** 2).sum(-1))
    chosen = [start]
    for _ in range(n_centers - 1):
        chosen.append(int(d[:, chosen].min(1).argmax()))
    return np.array(chosen)


def test_same_random_state_gives_bit_identical_indices(clusters):
    a = GreedyCoresetSampler(coreset_ratio=0.05, random_state=7).fit(clusters)
    b = GreedyCoresetSampler(coreset_ratio=0.05, random_state=7).fit(clusters)
    np.testing.assert_array_equal(a.indices_, b.indices_)
    assert a.radius_ == b.radius_


def test_different_random_states_start_from_different_rows(clusters):
    starts = {
        int(GreedyCoresetSampler(coreset_ratio=0.01, random_state=seed).fit(clusters).indices_[0])
        for seed in range(5)
    }
    assert len(starts) == 5


@pytest.mark.parametrize(
    "ratio, n_samples, expected",
    [(0.01, 2000, 20), (0.1, 2000, 200), (0.25, 2000, 500), (0.333, 2000, 666), (0.7, 10, 7)],
)
def test_selects_ceil_of_ratio_times_rows(ratio, n_samples, expected):
    X = np.random.RandomState(0).normal(size=(n_samples, 8)).astype(np.float32)
    sampler = GreedyCoresetSampler(coreset_ratio=ratio, random_state=0).fit(X)
    assert sampler.indices_.shape == (expected,)
    assert sampler.indices_.dtype == np.int64


def test_tiny_ratio_still_selects_one_row(gaussian):
    sampler = GreedyCoresetSampler(coreset_ratio=1e-9, random_state=0).fit(gaussian)
    assert sampler.indices_.shape == (1,)


def test_ratio_one_keeps_every_row_in_order(gaussian):
    sampler = GreedyCoresetSampler(coreset_ratio=1.0, random_state=0).fit(gaussian)
    np.testing.assert_array_equal(sampler.indices_, np.arange(len(gaussian)))
    assert sampler.radius_ == 0.0
    assert sampler.projection_ is None


@pytest.mark.parametrize("method", ["greedy", "accelerated"])
def test_indices_are_unique_and_in_range(clusters, method):
    sampler = GreedyCoresetSampler(coreset_ratio=0.2, method=method, random_state=0)
    indices = sampler.fit(clusters).indices_
    assert len(np.unique(indices)) == len(indices) == 800
    assert indices.min() >= 0 and indices.max() < len(clusters)


def test_duplicate_rows_are_never_selected_twice():
    X = np.repeat(np.random.RandomState(0).normal(size=(10, 6)), 20, axis=0).astype(np.float32)
    indices = GreedyCoresetSampler(coreset_ratio=0.5, random_state=0).fit(X).indices_
    assert len(np.unique(indices)) == 100
    assert len(np.unique(X[indices[:10]], axis=0)) == 10  # every distinct row first


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("data", ["gaussian", "clusters"])
def test_accelerated_selects_the_same_indices_as_greedy(data, threads, request, monkeypatch):
    X = request.getfixturevalue(data)
    plain = GreedyCoresetSampler(coreset_ratio=0.1, method="greedy", random_state=3).fit(X)
    # Shares of 200 points, each screened by its own thread (a few per round).
    monkeypatch.setattr(coreset, "_MIN_SHARE_ROWS", 200)
    shares = []
    update = coreset._update_share
    monkeypatch.setattr(coreset, "_update_share", lambda share, *a: shares.append(id(share)) or update(share, *a))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast = GreedyCoresetSampler(coreset_ratio=0.1, method="accelerated", random_state=3).fit(X)
    finally:
        torch.set_num_threads(previous)
    assert len(set(shares)) == min(threads, len(X) // 200)
    np.testing.assert_array_equal(fast.indices_, plain.indices_)


def test_accelerated_picks_past_points_that_an_earlier_pick_lowers(clusters, monkeypatch):
    # A block's farthest points cluster: stopping at the first one an earlier pick
    # might lower took 85 rounds here; lowering them exactly and picking on takes 34.
    sizes = []
    update = coreset._update_share
    monkeypatch.setattr(coreset, "_update_share", lambda share, C, *a: sizes.append(len(C)) or update(share, C, *a))
    fast = GreedyCoresetSampler(coreset_ratio=0.1, method="accelerated", random_state=3).fit(clusters)
    plain = GreedyCoresetSampler(coreset_ratio=0.1, method="greedy", random_state=3).fit(clusters)
    np.testing.assert_array_equal(fast.indices_, plain.indices_)
    assert sum(sizes) == len(fast.indices_) - 1 and len(sizes) <= 40


def test_small_accelerated_selections_make_the_plain_passes(gaussian, monkeypatch):
    monkeypatch.setattr(coreset, "_PLAIN_MAX_WORK", 50 * len(gaussian))
    plain = []
    monkeypatch.setattr(coreset, "_plain_greedy", lambda *a: plain.append(1) or _plain_greedy(*a))
    Z = torch.from_numpy(gaussian)
    for n_centers in (50, 51):
        indices, _ = k_center_greedy(Z, n_centers, 0, method="accelerated")
        want, _ = _plain_greedy(Z, n_centers, torch.tensor([0]), 0)
        torch.testing.assert_close(indices, want, rtol=0, atol=0)
    assert plain == [1]  # 50 centres plainly, 51 accelerated


def test_accelerated_radius_within_5_percent_of_greedy_in_feature_space(gaussian):
    plain, fast = (
        GreedyCoresetSampler(coreset_ratio=0.05, method=method, random_state=0).fit(gaussian)
        for method in ("greedy", "accelerated")
    )
    radii = [coverage_radius(gaussian, s.indices_) for s in (plain, fast)]
    assert radii[1] <= 1.05 * radii[0]


@pytest.mark.parametrize("method", ["greedy", "accelerated"])
def test_greedy_matches_brute_force_farthest_first_traversal(method):
    X = np.random.RandomState(2).uniform(size=(60, 2)).astype(np.float32)
    sampler = GreedyCoresetSampler(
        coreset_ratio=0.2, projection_dim=None, method=method, random_state=0
    ).fit(X)
    expected = brute_force_greedy(X, 12, int(sampler.indices_[0]))
    np.testing.assert_array_equal(sampler.indices_, expected)


def test_greedy_radius_is_within_twice_the_optimal_k_center_radius():
    X = np.random.RandomState(3).uniform(size=(14, 2)).astype(np.float32)
    radius = GreedyCoresetSampler(
        coreset_ratio=3 / 14, projection_dim=None, method="greedy", random_state=0
    ).fit(X).radius_
    optimum = min(coverage_radius(X, list(c)) for c in itertools.combinations(range(14), 3))
    assert optimum <= radius <= 2 * optimum


def test_radius_is_the_coverage_radius_of_the_selection(clusters):
    sampler = GreedyCoresetSampler(coreset_ratio=0.05, projection_dim=None, random_state=0)
    sampler.fit(clusters)
    assert sampler.radius_ == pytest.approx(coverage_radius(clusters, sampler.indices_), rel=1e-4)


def test_projects_to_projection_dim_only_below_n_features(gaussian):
    projected = GreedyCoresetSampler(coreset_ratio=0.01, projection_dim=32, random_state=0)
    assert projected.fit(gaussian).projection_.components_.shape == (32, 160)
    kept = GreedyCoresetSampler(coreset_ratio=0.01, projection_dim=160, random_state=0)
    assert kept.fit(gaussian).projection_ is None


def test_transform_returns_the_selected_rows_in_order(clusters):
    sampler = GreedyCoresetSampler(coreset_ratio=0.05, random_state=0).fit(clusters)
    coreset = sampler.transform(clusters)
    assert coreset.dtype == np.float32
    np.testing.assert_array_equal(coreset, clusters[sampler.indices_])
    np.testing.assert_array_equal(
        GreedyCoresetSampler(coreset_ratio=0.05, random_state=0).fit_transform(clusters), coreset
    )


def test_transform_rejects_a_matrix_with_other_rows(clusters):
    sampler = GreedyCoresetSampler(coreset_ratio=0.05, random_state=0).fit(clusters)
    with pytest.raises(ValueError, match="fitted on, which had 4000 rows; got X with 3999 rows"):
        sampler.transform(clusters[:-1])


def test_transform_rejects_a_matrix_with_other_features(clusters):
    sampler = GreedyCoresetSampler(coreset_ratio=0.05, random_state=0).fit(clusters)
    with pytest.raises(ValueError, match="48 features"):
        sampler.transform(clusters[:, :10])


@pytest.mark.parametrize(
    "param, value",
    [("coreset_ratio", 0.0), ("coreset_ratio", 1.5), ("method", "fast"), ("projection_dim", 0),
     ("projection_dtype", "int8"), ("device", 3)],
)
def test_invalid_parameters_are_rejected_at_fit(gaussian, param, value):
    with pytest.raises(InvalidParameterError, match=param):
        GreedyCoresetSampler(**{param: value}).fit(gaussian)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error(clusters):
    with pytest.raises(ValueError, match="CUDA is not available"):
        GreedyCoresetSampler(coreset_ratio=0.05, device="cuda").fit(clusters)


def test_torch_input_selects_the_same_rows_as_numpy(clusters):
    from_numpy = GreedyCoresetSampler(coreset_ratio=0.05, random_state=0).fit(clusters)
    from_torch = GreedyCoresetSampler(coreset_ratio=0.05, random_state=0)
    from_torch.fit(torch.from_numpy(clusters))
    np.testing.assert_array_equal(from_torch.indices_, from_numpy.indices_)
    coreset = from_torch.transform(torch.from_numpy(clusters))
    assert isinstance(coreset, np.ndarray) and coreset.dtype == np.float32


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_projection_keeps_the_coverage(clusters, dtype):
    full = GreedyCoresetSampler(coreset_ratio=0.05, random_state=0).fit(clusters)
    half = GreedyCoresetSampler(coreset_ratio=0.05, projection_dtype=dtype, random_state=0)
    half.fit(clusters)
    assert len(np.unique(half.indices_)) == len(full.indices_)
    radii = [coverage_radius(clusters, s.indices_) for s in (full, half)]
    assert radii[1] <= 1.05 * radii[0]


def test_half_precision_accelerated_matches_half_precision_greedy(clusters):
    fits = [
        GreedyCoresetSampler(
            coreset_ratio=0.05, method=method, projection_dtype="float16", random_state=0
        ).fit(clusters)
        for method in ("greedy", "accelerated")
    ]
    np.testing.assert_array_equal(fits[0].indices_, fits[1].indices_)


def test_verbose_prints_progress(clusters, capsys):
    GreedyCoresetSampler(coreset_ratio=0.05, random_state=0, verbose=1).fit(clusters)
    out = capsys.readouterr().out
    assert "[GreedyCoresetSampler] 200/200 centres, radius" in out


def test_k_center_greedy_rejects_more_centres_than_rows():
    with pytest.raises(ValueError, match="1 <= n_centers <= 5"):
        k_center_greedy(torch.zeros(5, 2), 6, 0)


@pytest.mark.parametrize("method", ["greedy", "accelerated"])
def test_continuing_from_a_greedy_prefix_repeats_the_run(clusters, method):
    Z = torch.from_numpy(clusters)
    full, radius = k_center_greedy(Z, 150, 7, method=method)
    continued, continued_radius = k_center_greedy(Z, 150, full[:60].numpy(), method=method)
    torch.testing.assert_close(continued, full, rtol=0, atol=0)
    assert continued_radius == radius


def test_accelerated_continues_from_given_centres_like_greedy(clusters):
    Z = torch.from_numpy(clusters)
    given = np.random.RandomState(0).choice(len(Z), 300, replace=False)  # more than a block
    plain, plain_radius = k_center_greedy(Z, 500, given, method="greedy")
    fast, fast_radius = k_center_greedy(Z, 500, given, method="accelerated")
    np.testing.assert_array_equal(fast.numpy()[:300], given)
    torch.testing.assert_close(fast, plain, rtol=0, atol=0)
    assert fast_radius == plain_radius


def test_k_center_greedy_rejects_repeated_given_centres():
    with pytest.raises(ValueError, match="distinct indices"):
        k_center_greedy(torch.zeros(5, 2), 3, [1, 1])


def test_covering_radius_is_the_largest_distance_to_the_nearest_centre(clusters):
    indices = np.arange(0, len(clusters), 40)
    got = covering_radius(clusters, clusters[indices])
    assert got == pytest.approx(coverage_radius(clusters, indices), rel=1e-5)


@pytest.mark.parametrize("projection_dim", [None, 16])
def test_merged_shard_coresets_stay_within_the_composition_bound(clusters, projection_dim):
    # Bound of merge_coresets' Notes, in the space the selection runs in.
    k, shards = 60, np.array_split(clusters, 3)
    parts, radii = [], []
    for shard in shards:
        stream = ProjectedRows(len(shard), shard.shape[1], projection_dim=projection_dim,
                               dtype="float32", random_state=0, device=torch.device("cpu"))
        stream.add(torch.from_numpy(shard))
        indices, radius = stream.select(n_selected=k)
        parts.append(shard[indices])
        radii.append(radius)
    merged, union_radius = merge_coresets(parts, k, projection_dim=projection_dim, random_state=0)
    bank = np.concatenate(parts)[merged]
    single = GreedyCoresetSampler(coreset_ratio=k / len(clusters), projection_dim=projection_dim,
                                  random_state=0).fit(clusters)
    projection = single.projection_
    space = (lambda X: X) if projection is None else projection.transform
    sharded_radius = covering_radius(space(clusters), space(bank))
    assert sharded_radius <= (max(radii) + union_radius) * (1 + 1e-4)
    assert sharded_radius <= 4 * single.radius_
    if projection_dim is None:  # no projection: the single greedy's radius in the same space
        assert sharded_radius <= 1.5 * single.radius_  # far from the worst case on real-like data


def test_merging_one_shard_keeps_its_selection(clusters):
    stream = ProjectedRows(len(clusters), clusters.shape[1], projection_dim=16, dtype="float32",
                           random_state=0, device=torch.device("cpu"))
    stream.add(torch.from_numpy(clusters))
    indices, _ = stream.select(n_selected=50)
    merged, radius = merge_coresets([clusters[indices]], 50, projection_dim=16, random_state=0)
    np.testing.assert_array_equal(merged, np.arange(50))
    assert radius == 0.0
