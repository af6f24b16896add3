import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from skpatchcore.scoring import max_patches, reweighted_scores, rerank_max_patches, search_batches


def test_max_patches_picks_the_largest_distance():
    dist = np.array([[0.1, 0.5, 0.2], [0.9, 0.3, 0.4]])
    idx = np.array([[7, 8, 9], [1, 2, 3]])
    s_star, patch, nearest = max_patches(dist, idx)
    np.testing.assert_array_equal(s_star, [0.5, 0.9])
    np.testing.assert_array_equal(patch, [1, 0])
    np.testing.assert_array_equal(nearest, [8, 1])


def test_rerank_recovers_the_exact_maximum_from_upper_bounds():
    rng = np.random.RandomState(0)
    bank = rng.normal(size=(200, 8)).astype(np.float32)
    patches = rng.normal(size=(5, 64, 8)).astype(np.float32)
    nn = NearestNeighbors(n_neighbors=1).fit(bank)
    exact, exact_idx = nn.kneighbors(patches.reshape(-1, 8))
    exact, exact_idx = exact.reshape(5, 64), exact_idx.reshape(5, 64)
    # An approximate search over-estimates: inflate the distances at random.
    approx = exact * rng.uniform(1.0, 1.5, size=exact.shape)
    s_star, patch, nearest = rerank_max_patches(patches, approx, lambda q, _: nn.kneighbors(q), first=1)
    want_s, want_patch, want_nearest = max_patches(exact, exact_idx)
    np.testing.assert_allclose(s_star, want_s, rtol=1e-6)
    np.testing.assert_array_equal(patch, want_patch)
    np.testing.assert_array_equal(nearest, want_nearest)


def test_reweighting_follows_equation_7():
    bank = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    query = np.array([[0.0, 1.0]], dtype=np.float32)
    support = np.array([[0, 1, 2]])
    d = np.array([1.0, np.sqrt(2.0), 1.0])  # d_0 = s* = 1
    want = (1 - np.exp(d[0]) / np.exp(d).sum()) * d[0]
    np.testing.assert_allclose(reweighted_scores(query, bank, support), [want], rtol=1e-6)


def test_single_support_entry_disables_reweighting():
    bank = np.zeros((1, 2), dtype=np.float32)
    out = reweighted_scores(np.array([[0.3, 0.4]], np.float32), bank, np.array([[0]]))
    np.testing.assert_allclose(out, [0.5])


def test_rerank_checks_few_patches_when_the_bounds_are_tight():
    rng = np.random.RandomState(1)
    bank = rng.normal(size=(300, 8)).astype(np.float32)
    patches = rng.normal(size=(4, 256, 8)).astype(np.float32)
    nn = NearestNeighbors(n_neighbors=1).fit(bank)
    exact, exact_idx = (a.reshape(4, 256) for a in nn.kneighbors(patches.reshape(-1, 8)))
    approx = exact * rng.uniform(1.0, 1.01, size=exact.shape)
    asked = []

    def counting_nn(queries, bounds):
        assert np.all(bounds >= nn.kneighbors(queries)[0][:, 0] - 1e-6)
        asked.append(len(queries))
        return nn.kneighbors(queries)

    s_star, patch, _ = rerank_max_patches(patches, approx, counting_nn, first=2)
    want_s, want_patch, _ = max_patches(exact, exact_idx)
    np.testing.assert_allclose(s_star, want_s, rtol=1e-6)
    np.testing.assert_array_equal(patch, want_patch)
    # One query per round for all images, the first of 2 patches each; then only
    # patches whose bound reaches the best found are checked, in doubling rounds.
    assert asked[0] == 2 * len(patches)
    reach = (approx >= want_s[:, None]).sum(axis=1)
    assert sum(asked) <= 2 * np.maximum(reach, 2).sum()
    assert len(asked) <= 1 + int(np.ceil(np.log2(reach.max())))


@pytest.mark.parametrize(
    "batch_size, n_images, want",
    [
        (2, 3, [slice(0, 2), slice(2, 4), slice(4, 7)]),  # 3 images fit: 2 + 2 do not
        (2, 4, [slice(0, 4), slice(4, 7)]),
        (1, 3, [slice(0, 3), slice(3, 6), slice(6, 7)]),
        (3, 2, [slice(0, 3), slice(3, 6), slice(6, 7)]),  # larger batches pass as they are
        (2, 0, [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 7)]),  # room for no image
    ],
)
def test_search_batches_join_whole_images_in_order(batch_size, n_images, want):
    patches = torch.arange(7 * 2 * 3 * 4, dtype=torch.float32).reshape(7, 2, 3, 4)
    network = ((slice(i, min(i + batch_size, 7)), patches[i : i + batch_size]) for i in range(0, 7, batch_size))
    max_bytes = n_images * patches[0].numel() * 4 + 3  # whole images only
    got = [(batch, joined.copy()) for batch, joined in search_batches(network, max_bytes)]
    assert [batch for batch, _ in got] == want
    for batch, joined in got:
        assert isinstance(joined, np.ndarray) and joined.dtype == np.float32
        np.testing.assert_array_equal(joined, patches[batch].numpy())
