"""The CUDA code paths give the CPU's results (run only where torch sees a GPU).

Each test computes the same thing with ``device="cuda"`` and on the CPU. The
neighbour and coreset data have no near-ties (asserted in the tests), so
float32 rounding, which differs between the devices, cannot change which
neighbour or coreset row comes first: indices must match exactly. The
detector runs on the tiny fixtures of conftest.py, whose coreset stayed the
same when the network's weights were perturbed by 1e-5 relative on the CPU.
"""

import io
import pickle

import numpy as np
import pytest
import torch

from skpatchcore import GreedyCoresetSampler, NearestNeighborIndex, PatchCoreDetector
from skpatchcore.coreset import k_center_greedy
from skpatchcore.neighbors import exact_kneighbors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def ieee_float32(monkeypatch):
    """Full float32 precision on the GPU, as on the CPU.

    cuDNN convolutions default to TF32 (10-bit mantissa) on Ampere and later
    GPUs, so features differ from the CPU's by about 5e-4 relative. Perturbing
    the tiny network's weights by as much on the CPU changed the detector's
    coreset in 2 of 3 trials and its scores by up to 6 % (by 1e-5: the same
    coreset, scores within 2e-5). These tests check the CUDA code paths, not
    TF32 rounding; matrix products are pinned to float32 too, in case the
    environment turned TF32 on for them.
    """
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def clusters(n_samples: int, n_features: int, seed: int) -> np.ndarray:
    """Far-apart Gaussian clusters of low intrinsic dimension, like patch features."""
    rng = np.random.RandomState(seed)
    centers = rng.normal(scale=10.0, size=(20, n_features))
    spans = rng.normal(size=(20, 4, n_features))
    labels = rng.randint(20, size=n_samples)
    latent = rng.normal(size=(n_samples, 1, 4))
    noise = 0.05 * rng.normal(size=(n_samples, n_features))
    return (centers[labels] + (latent @ spans[labels])[:, 0] + noise).astype(np.float32)


def min_relative_gap(sq_dist: np.ndarray, n_neighbors: int) -> float:
    """Smallest relative gap between consecutive ones of the ``n_neighbors + 1``
    smallest squared distances of a row: how far the data are from a tie."""
    smallest = np.sort(sq_dist, axis=1)[:, : n_neighbors + 1]
    return float((np.diff(smallest, axis=1) / smallest[:, 1:]).min())


def reference_greedy(Z: np.ndarray, n_centers: int, start: int) -> tuple[np.ndarray, float]:
    """Greedy k-center in float64, and the smallest relative lead of a pick over the runner-up."""
    Z = Z.astype(np.float64)
    min_sq = ((Z - Z[start]) ** 2).sum(1)
    selected, lead = [start], np.inf
    for _ in range(n_centers - 1):
        min_sq[selected] = -1.0
        runner_up, best = np.argsort(min_sq)[-2:]
        lead = min(lead, (min_sq[best] - min_sq[runner_up]) / min_sq[best])
        selected.append(int(best))
        min_sq = np.minimum(min_sq, ((Z - Z[best]) ** 2).sum(1))
    return np.array(selected), lead


def pickled_tensor_devices(obj) -> set[str]:
    """Device types of every tensor that pickling ``obj`` writes."""
    devices = set()

    class Recorder(pickle.Pickler):
        def persistent_id(self, item):
            if isinstance(item, torch.Tensor):
                devices.add(item.device.type)
            return None  # pickled as usual

    Recorder(io.BytesIO()).dump(obj)
    return devices


def module_devices(module: torch.nn.Module) -> set[str]:
    return {t.device.type for t in [*module.parameters(), *module.buffers()]}


# ---------------------------------------------------------------- neighbours
@pytest.fixture(scope="module")
def search_data():
    """Bank, queries and their groups, checked free of near-ties for 5 neighbours.

    float32 squared distances are off by about 1e-6 relative here, far below
    the 1e-4 gap asserted between consecutive neighbours.
    """
    rng = np.random.RandomState(7)
    bank = rng.normal(size=(400, 16)).astype(np.float32)
    queries = rng.normal(size=(100, 16)).astype(np.float32)
    query_groups, bank_groups = rng.randint(3, size=100), rng.randint(3, size=400)
    sq = ((queries[:, None].astype(np.float64) - bank[None]) ** 2).sum(-1)
    assert min_relative_gap(sq, 5) > 1e-4
    sq[query_groups[:, None] == bank_groups[None, :]] = np.inf
    assert min_relative_gap(sq, 5) > 1e-4
    return bank, queries, query_groups, bank_groups


@pytest.mark.parametrize("working_memory", [None, 0.05])  # 0.05 MiB: chunks of 16 queries
@pytest.mark.parametrize("n_neighbors", [1, 5])
def test_exact_kneighbors_on_cuda_matches_cpu(search_data, n_neighbors, working_memory):
    bank, queries, _, _ = search_data
    cpu = exact_kneighbors(queries, bank, n_neighbors, working_memory=working_memory)
    cuda = exact_kneighbors(queries, bank, n_neighbors, working_memory=working_memory, device="cuda")
    assert all(isinstance(a, np.ndarray) for a in cuda)
    np.testing.assert_array_equal(cuda[1], cpu[1])
    np.testing.assert_allclose(cuda[0], cpu[0], rtol=1e-4)


def test_exact_kneighbors_on_cuda_matches_cpu_with_groups(search_data):
    bank, queries, query_groups, bank_groups = search_data
    groups = dict(query_groups=query_groups, bank_groups=bank_groups)
    cpu = exact_kneighbors(queries, bank, 5, **groups)
    cuda = exact_kneighbors(queries, bank, 5, device="cuda", **groups)
    np.testing.assert_array_equal(cuda[1], cpu[1])
    np.testing.assert_allclose(cuda[0], cpu[0], rtol=1e-4)
    assert not (bank_groups[cuda[1]] == query_groups[:, None]).any()


def test_exact_kneighbors_takes_tensors_already_on_the_gpu(search_data):
    bank, queries, _, _ = search_data
    cpu = exact_kneighbors(queries, bank, 5)
    on_gpu = [torch.from_numpy(a).cuda() for a in (queries, bank, (bank**2).sum(1))]
    cuda = exact_kneighbors(on_gpu[0], on_gpu[1], 5, bank_sq_norms=on_gpu[2], device="cuda")
    np.testing.assert_array_equal(cuda[1], cpu[1])
    np.testing.assert_allclose(cuda[0], cpu[0], rtol=1e-4)


@pytest.mark.parametrize("n_neighbors", [1, 5])
def test_exact_index_on_cuda_matches_cpu(search_data, n_neighbors):
    bank, queries, _, _ = search_data
    cpu = NearestNeighborIndex("exact").fit(bank).kneighbors(queries, n_neighbors)
    index = NearestNeighborIndex("exact", device="cuda").fit(torch.from_numpy(bank).cuda())
    for X in (queries, torch.from_numpy(queries).cuda()):
        cuda = index.kneighbors(X, n_neighbors)
        np.testing.assert_array_equal(cuda[1], cpu[1])
        np.testing.assert_allclose(cuda[0], cpu[0], rtol=1e-4)


# ------------------------------------------------------------------- coreset
# The selection's distances are float32 sums of squared differences, whose
# rounding differs between the CPU and the GPU (reduction order; on the GPU
# also the projection's matrix product and the principal-axes rotation), by
# about 1e-6 relative. That can only change a pick whose lead over the
# runner-up is as small; on data where every pick leads by more than 1e-4
# (asserted against a float64 reference) both devices must select the same
# rows, with either method.
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("method", ["greedy", "accelerated"])
def test_k_center_greedy_on_cuda_selects_the_cpu_rows(method, dtype):
    # The same stored values on both devices (half precision included): only the
    # float32 accumulation differs.
    Z = torch.from_numpy(clusters(1000, 32, seed=4)).to(getattr(torch, dtype))
    expected, lead = reference_greedy(Z.double().numpy(), 40, start=0)
    assert lead > 1e-4
    cpu, cpu_radius = k_center_greedy(Z, 40, 0, method=method)
    cuda, cuda_radius = k_center_greedy(Z.cuda(), 40, 0, method=method)
    assert cuda.is_cuda
    np.testing.assert_array_equal(cuda.cpu().numpy(), expected)
    np.testing.assert_array_equal(cpu.numpy(), expected)
    assert cuda_radius == pytest.approx(cpu_radius, rel=1e-4)


@pytest.fixture(scope="module")
def features():
    return clusters(1000, 160, seed=1)


@pytest.mark.parametrize("method", ["greedy", "accelerated"])
def test_coreset_sampler_on_cuda_selects_the_cpu_rows(features, method):
    params = dict(coreset_ratio=0.04, projection_dim=32, method=method, random_state=0)
    cpu = GreedyCoresetSampler(**params).fit(features)
    cuda = GreedyCoresetSampler(**params, device="cuda").fit(features)
    # Distances in the projection, where the selection runs (the rotation keeps them).
    X = features.astype(np.float64)
    Z = (X - X.mean(0)) @ cpu.projection_.components_.T
    expected, lead = reference_greedy(Z, len(cpu.indices_), start=cpu.indices_[0])
    assert lead > 1e-4
    np.testing.assert_array_equal(cuda.indices_, expected)
    np.testing.assert_array_equal(cpu.indices_, expected)
    assert cuda.radius_ == pytest.approx(cpu.radius_, rel=1e-4)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_coreset_on_cuda_keeps_the_coverage(features, dtype):
    # Rounding the GPU's projection, which differs from the CPU's in its last float32
    # bits, to half precision can move a coordinate by a half-precision step (up to
    # 4e-3 relative for bfloat16): the rows may legitimately differ from the CPU's, so
    # the coverage is compared, in the original features, with the float32 selection.
    params = dict(coreset_ratio=0.04, projection_dim=32, random_state=0)
    full = GreedyCoresetSampler(**params).fit(features)
    half = GreedyCoresetSampler(**params, projection_dtype=dtype, device="cuda").fit(features)
    assert len(np.unique(half.indices_)) == len(full.indices_)
    assert half.indices_[0] == full.indices_[0]  # the seeded start
    radii = [
        exact_kneighbors(features, features[s.indices_], 1)[0].max()
        for s in (full, half)
    ]
    assert radii[1] <= 1.05 * radii[0]


# ------------------------------------------------------------------ detector
@pytest.fixture
def detectors(tiny_params, textures):
    """The tiny detector fitted on the CPU and on the GPU."""
    normal, _, _ = textures
    cpu = PatchCoreDetector(**tiny_params).fit(normal[6:])
    cuda = PatchCoreDetector(**tiny_params, device="cuda").fit(normal[6:])
    return cpu, cuda


@pytest.fixture
def test_images(textures):
    normal, defective, _ = textures
    return np.concatenate([normal[:6], defective])


def test_detector_fitted_on_cuda_matches_cpu(detectors):
    cpu, cuda = detectors
    assert module_devices(cuda.feature_extractor_) == {"cuda"}
    np.testing.assert_array_equal(cuda.coreset_indices_, cpu.coreset_indices_)
    np.testing.assert_allclose(
        cuda.memory_bank_, cpu.memory_bank_, rtol=1e-4, atol=1e-4 * np.abs(cpu.memory_bank_).max()
    )
    np.testing.assert_allclose(cuda.train_score_samples_, cpu.train_score_samples_, rtol=1e-3)
    assert cuda.offset_ == pytest.approx(cpu.offset_, rel=1e-3)
    assert cuda.pixel_threshold_ == pytest.approx(cpu.pixel_threshold_, rel=1e-3)


def test_detector_on_cuda_scores_like_cpu(detectors, test_images):
    cpu, cuda = detectors
    np.testing.assert_allclose(
        cuda.score_samples(test_images), cpu.score_samples(test_images), rtol=1e-3
    )


def test_detector_on_cuda_maps_like_cpu(detectors, test_images):
    cpu, cuda = detectors
    maps = cpu.anomaly_maps(test_images)
    np.testing.assert_allclose(
        cuda.anomaly_maps(test_images), maps, rtol=1e-3, atol=1e-3 * maps.max()
    )


def test_detector_on_cuda_predicts_like_cpu(detectors, test_images):
    cpu, cuda = detectors
    # The held-out normal images score at least 6 % away from the threshold.
    np.testing.assert_array_equal(cuda.predict(test_images), cpu.predict(test_images))


def test_cuda_fitted_detector_pickles_its_network_on_the_cpu(detectors):
    _, cuda = detectors
    assert pickled_tensor_devices(cuda) == {"cpu"}
    loaded = pickle.loads(pickle.dumps(cuda))
    assert module_devices(loaded.feature_extractor_) == {"cpu"}
    # Pickling copied the network: the live detector's stays on the GPU.
    assert module_devices(cuda.feature_extractor_) == {"cuda"}


def test_cuda_fitted_detector_scores_on_the_cpu_after_loading(detectors, test_images):
    cpu, cuda = detectors
    loaded = pickle.loads(pickle.dumps(cuda)).set_params(device="cpu")
    np.testing.assert_allclose(
        loaded.score_samples(test_images), cpu.score_samples(test_images), rtol=1e-3
    )
    # Network and exact search ran on the CPU.
    assert module_devices(loaded.feature_extractor_) == {"cpu"}
    assert torch.device(loaded.nn_index_.device).type == "cpu"
