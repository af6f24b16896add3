"""PatchCore on a real Dask cluster (2 worker processes): results against one process.

Needs the ``dask`` extra; skips without it. One ``LocalCluster`` serves the
whole module; images are small generated textures written as PNG files that
the workers read themselves.
"""

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("distributed", reason='needs the dask extra: pip install "skpatchcore[dask]"')

import dask.array as da  # noqa: E402
import joblib  # noqa: E402
from distributed import Client, LocalCluster, get_task_stream  # noqa: E402
from sklearn.model_selection import GridSearchCV, StratifiedKFold  # noqa: E402

from skpatchcore import ImageReader, ModuleExtractor, NearestNeighborIndex, PatchCoreDetector  # noqa: E402
from skpatchcore.coreset import covering_radius  # noqa: E402
from skpatchcore.distributed import (  # noqa: E402
    ShardedIndex,
    TorchThreads,
    fit_sharded,
    score_samples_distributed,
    shard_memory_bank,
)
from skpatchcore.features import extract_patch_features  # noqa: E402
from skpatchcore.metrics import image_auroc, image_auroc_scorer, pixel_auroc  # noqa: E402

from .conftest import tiny_cnn  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Local references on the workers' thread count: CPU kernels may round differently
    with another (EfficientNet-Lite0 scores move by ~4e-6 between 1 and 2 threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client():
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster, Client(cluster) as client:
        client.register_plugin(TorchThreads(1))
        yield client


def params(**extra):
    return {
        "feature_extractor": ModuleExtractor(tiny_cnn(), ["layer1", "layer2"]), "image_size": 32,
        "random_state": 0, "algorithm": "exact", "batch_size": 2, **extra,
    }


@pytest.fixture(scope="module")
def data(textures, tmp_path_factory):
    """PNG files of 10 training textures and 12 test images (6 normal, 6 defective)."""
    normal, defective, masks = textures
    folder = tmp_path_factory.mktemp("images")
    images = (np.concatenate([normal, defective]) * 255).round().astype(np.uint8)
    paths = []
    for i, image in enumerate(images):
        paths.append(str(folder / f"{i:02d}.png"))
        Image.fromarray(image).save(paths[-1])
    test_masks = np.concatenate([np.zeros_like(masks), masks])
    return {
        "train": paths[6:16], "test": paths[:6] + paths[16:], "labels": np.r_[np.zeros(6), np.ones(6)],
        "masks": test_masks, "pixels": ImageReader().transform(paths),
    }


@pytest.fixture(scope="module")
def fitted(data):
    return PatchCoreDetector(**params()).fit(ImageReader().transform(data["train"]))


# ------------------------------------------------------------------ scoring
def test_distributed_scores_equal_local_bit_for_bit(client, data, fitted):
    want = fitted.score_samples(ImageReader().transform(data["test"]))
    # 5 images per task: rounded up to 6 (a multiple of batch_size), tasks of 6 and 6.
    got = score_samples_distributed(fitted, data["test"], images_per_task=5, client=client)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_the_detector_is_pickled_once_not_per_task(client, data, fitted, monkeypatch):
    pickled = []
    getstate = PatchCoreDetector.__getstate__
    monkeypatch.setattr(PatchCoreDetector, "__getstate__", lambda det: pickled.append(det) or getstate(det))
    score_samples_distributed(fitted, data["test"], images_per_task=2)  # 6 tasks on 2 workers
    assert len(pickled) == 1


def test_every_worker_scores_and_results_keep_the_input_order(client, data, fitted):
    reversed_paths = data["test"][::-1]
    want = fitted.score_samples(ImageReader().transform(reversed_paths))
    with get_task_stream(client) as stream:
        got = score_samples_distributed(fitted, reversed_paths, images_per_task=2)  # default client
    np.testing.assert_array_equal(got, want)
    workers = {task["worker"] for task in stream.data if task["key"].startswith("_score_part")}
    assert len(workers) == 2


def test_distributed_maps_equal_local_maps(client, data, fitted):
    X = ImageReader().transform(data["test"])
    want_maps, want_scores = fitted.anomaly_maps(X, return_score_samples=True)
    scores, maps = score_samples_distributed(fitted, data["test"], return_maps=True, images_per_task=4)
    np.testing.assert_array_equal(scores, want_scores)
    np.testing.assert_array_equal(np.stack(maps), want_maps)


def test_maps_written_to_a_folder_in_input_order(client, data, fitted, tmp_path):
    X = ImageReader().transform(data["test"])
    want = fitted.anomaly_maps(X)
    _, files = score_samples_distributed(fitted, data["test"], maps_folder=tmp_path / "npy")
    assert [f.split("/")[-1] for f in files[:2]] == ["000000_00.npy", "000001_01.npy"]
    np.testing.assert_array_equal(np.stack([np.load(f) for f in files]), want)

    _, files = score_samples_distributed(fitted, data["test"], maps_folder=tmp_path / "png", map_format="png")
    read_back = ImageReader().transform(files)[..., 0]  # 16-bit files: value / 65535
    np.testing.assert_allclose(read_back, np.clip(want / (2 * fitted.pixel_threshold_), 0, 1), atol=1e-4)


def test_dask_array_of_images_scores_like_local(client, data, fitted):
    X = data["pixels"][:6]
    got = score_samples_distributed(fitted, da.from_array(X, chunks=(3, 32, 32, 3)), images_per_task=2)
    np.testing.assert_array_equal(got, fitted.score_samples(X))


def test_return_maps_and_maps_folder_exclude_each_other(client, data, fitted, tmp_path):
    with pytest.raises(ValueError, match="not both"):
        score_samples_distributed(fitted, data["test"], return_maps=True, maps_folder=tmp_path)


# -------------------------------------------------------------- sharded fit
def test_one_shard_is_the_single_machine_fit(client, data, fitted):
    det = fit_sharded(PatchCoreDetector(**params()), data["train"], n_shards=1)
    np.testing.assert_array_equal(det.memory_bank_, fitted.memory_bank_)
    np.testing.assert_array_equal(det.coreset_indices_, fitted.coreset_indices_)
    np.testing.assert_array_equal(det.train_score_samples_, fitted.train_score_samples_)
    assert (det.offset_, det.pixel_threshold_) == (fitted.offset_, fitted.pixel_threshold_)


@pytest.fixture(scope="module")
def sharded(client, data):
    return fit_sharded(PatchCoreDetector(**params()), data["train"], n_shards=2)


def test_sharded_fit_covers_the_training_patches_like_the_single_fit(data, fitted, sharded):
    patches = extract_patch_features(
        fitted.feature_extractor_, ImageReader().transform(data["train"]), image_size=32,
        embedding_dim=fitted.embedding_dim, batch_size=fitted.batch_size,
    )
    features = patches.reshape(-1, patches.shape[-1])
    ratio = covering_radius(features, sharded.memory_bank_) / covering_radius(features, fitted.memory_bank_)
    print(f"\nsharded / single covering radius: {ratio:.3f}")
    assert ratio <= 1.1
    # coreset_indices_ name the patches of all images in input order.
    np.testing.assert_allclose(sharded.memory_bank_, features[sharded.coreset_indices_], rtol=1e-4, atol=1e-6)
    assert len(sharded.memory_bank_) == len(fitted.memory_bank_)


def test_sharded_fit_scores_like_the_single_fit(data, fitted, sharded):
    X = ImageReader().transform(data["test"])
    aurocs = []
    for det in (fitted, sharded):
        maps, scores = det.anomaly_maps(X, return_score_samples=True)
        aurocs.append((image_auroc(data["labels"], -scores), pixel_auroc(data["masks"], maps)))
    print(f"\nimage / pixel AUROC, single {aurocs[0]}, sharded {aurocs[1]}")
    np.testing.assert_allclose(aurocs[1], aurocs[0], atol=0.005)


def test_sharded_fit_thresholds_come_from_the_same_held_out_images(fitted, sharded):
    np.testing.assert_array_equal(sharded.threshold_image_indices_, fitted.threshold_image_indices_)
    np.testing.assert_allclose(sharded.train_score_samples_, fitted.train_score_samples_, rtol=0.2)
    assert sharded.n_samples_seen_ == 10 and sharded.feature_shape_ == fitted.feature_shape_


def test_sharded_fit_of_a_dask_array_equals_that_of_the_files(client, data, sharded):
    X = da.from_array(ImageReader().transform(data["train"]), chunks=(4, 32, 32, 3))
    det = fit_sharded(PatchCoreDetector(**params()), X, n_shards=2)
    np.testing.assert_array_equal(det.memory_bank_, sharded.memory_bank_)
    assert det.offset_ == sharded.offset_


def test_sharded_fit_refuses_images_of_different_sizes(client, data, tmp_path):
    large = tmp_path / "large.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(large)
    det = PatchCoreDetector(**params(image_size=None))
    with pytest.raises(ValueError, match="different patch grids"):
        fit_sharded(det, data["train"][:2] + [str(large)] * 2, n_shards=2)
    assert not hasattr(det, "memory_bank_")


# ------------------------------------------------------------- sharded bank
def test_sharded_index_finds_the_unsharded_neighbours(client):
    rng = np.random.RandomState(0)
    bank, queries = rng.normal(size=(500, 16)).astype(np.float32), rng.normal(size=(40, 16)).astype(np.float32)
    index = ShardedIndex(n_shards=3).fit(bank)
    want = NearestNeighborIndex(algorithm="exact").fit(bank)
    for k in (1, 5):
        got_dist, got_idx = index.kneighbors(queries, k)
        want_dist, want_idx = want.kneighbors(queries, k)
        np.testing.assert_array_equal(got_idx, want_idx)
        np.testing.assert_array_equal(got_dist, want_dist)
    got, got_rows = index.bank_neighbors([0, 499, 250], 9)
    want_idx, want_rows = want.bank_neighbors([0, 499, 250], 9)
    np.testing.assert_array_equal(got, want_idx)
    np.testing.assert_array_equal(got_rows, want_rows)


def test_sharded_index_of_a_dask_array_bank(client):
    bank = np.random.RandomState(1).normal(size=(300, 8)).astype(np.float32)
    index = ShardedIndex(n_shards=2).fit(da.from_array(bank, chunks=(50, 8)))
    np.testing.assert_array_equal(index.offsets_, [0, 150, 300])
    np.testing.assert_array_equal(index.kneighbors(bank[:5])[1][:, 0], np.arange(5))


def test_sharded_bank_scores_equal_the_unsharded_detector(client, data, fitted):
    X = ImageReader().transform(data["test"])
    sharded = shard_memory_bank(fitted, n_shards=3)
    assert not hasattr(sharded, "memory_bank_") and hasattr(fitted, "memory_bank_")
    want_maps, want = fitted.anomaly_maps(X, return_score_samples=True)
    got_maps, got = sharded.anomaly_maps(X, return_score_samples=True)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_maps, want_maps)
    # score_samples alone takes the other path (largest_nearest, no patch distances).
    np.testing.assert_array_equal(sharded.score_samples(X), fitted.score_samples(X))
    np.testing.assert_array_equal(sharded.predict(X), fitted.predict(X))


def test_eq7_support_needs_every_shard(client, data, fitted):
    # The support of m* taken from m*'s own shard only would change scores here, so the
    # equality above shows that the support comes from all shards.
    bank, k = fitted.memory_bank_, fitted.n_neighbors
    shards = np.array_split(np.arange(len(bank)), 3)
    patches = extract_patch_features(fitted.feature_extractor_, ImageReader().transform(data["test"]),
                                     image_size=32, embedding_dim=fitted.embedding_dim)
    flat = patches.reshape(len(patches), -1, patches.shape[-1])
    dist, idx = fitted.nn_index_.kneighbors(flat.reshape(-1, flat.shape[-1]))
    dist, idx = dist.reshape(len(flat), -1), idx.reshape(len(flat), -1)
    nearest = idx[np.arange(len(flat)), dist.argmax(1)]
    _, full = fitted.nn_index_.bank_neighbors(nearest, k)
    differs = 0
    for i, m in enumerate(nearest):
        own = next(s for s in shards if m in s)
        local = NearestNeighborIndex(algorithm="exact").fit(bank[own])
        support = own[local.kneighbors(bank[m][None], k)[1][0]]
        differs += not np.array_equal(bank[support], full[i])
    assert differs > 0


def test_sharded_detector_does_not_pickle(client, fitted):
    sharded = shard_memory_bank(fitted, n_shards=2)
    with pytest.raises(TypeError, match="does not pickle"):
        pickle.dumps(sharded)


# ----------------------------------------------------------- search, threads
def test_grid_search_on_the_cluster_equals_local(client, textures):
    normal, defective, _ = textures
    X = np.concatenate([normal, defective])
    y = np.r_[np.zeros(len(normal)), np.ones(len(defective))]

    def search(n_jobs):
        return GridSearchCV(
            PatchCoreDetector(**params()), {"coreset_ratio": [0.05, 0.5], "n_neighbors": [1, 9]},
            scoring=image_auroc_scorer, cv=StratifiedKFold(2, shuffle=True, random_state=0),
            n_jobs=n_jobs,
        ).fit(X, y)

    with joblib.parallel_config(backend="dask"):
        on_cluster = search(-1)
    local = search(1)
    np.testing.assert_array_equal(on_cluster.cv_results_["mean_test_score"], local.cv_results_["mean_test_score"])
    assert on_cluster.best_params_ == local.best_params_


def test_torch_threads_reach_the_threads_that_run_tasks(client):
    def task_threads():
        return client.gather([client.submit(torch.get_num_threads, pure=False) for _ in range(4)])

    assert task_threads() == [1, 1, 1, 1]  # these threads have run torch already
    try:
        client.register_plugin(TorchThreads(2))
        assert task_threads() == [2, 2, 2, 2]
    finally:
        client.register_plugin(TorchThreads(1))
    assert task_threads() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="positive int"):
        TorchThreads(0)


# ------------------------------------------------------------ optional extra
def test_skpatchcore_does_not_import_dask_and_says_how_to_install_it():
    code = (
        "import sys; import skpatchcore, skpatchcore.persistence, skpatchcore.cli;"
        "assert 'dask' not in sys.modules and 'distributed' not in sys.modules;"
        "sys.modules['dask'] = None;"  # as if not installed
        "import skpatchcore.distributed"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0
    assert 'pip install "skpatchcore[dask]"' in done.stderr
