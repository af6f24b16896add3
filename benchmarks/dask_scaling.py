"""skpatchcore on Dask: 1 against 2 workers, sharded fit and partial_fit against one machine.

    python benchmarks/dask_scaling.py [--n-train 100] [--workers 1 2]

MVTec AD bottle from ../shared/data (never copied here): ``--n-train`` (100)
training images drawn with seed 0 (as ``skpatchcore benchmark --n-train``),
all 83 test images, 256 x 256, EfficientNet-Lite0 (ImageNet weights), exact
search, ``random_state=0`` (the paper-faithful setting of the README).

Printed, in order:

1. **One machine** (this process, torch's default threads): fit time,
   covering radius of the bank over every training patch
   (:func:`skpatchcore.coreset.covering_radius`, full feature space), image
   and pixel AUROC, and the single-node constants of ``docs/scaling.rst``:
   network time per image, coreset selection time per training row, exact
   search time per query patch, bytes per bank row in float32 / float16.
2. **Dask, 1 then 2 workers** (``LocalCluster(n_workers, threads_per_worker=1)``,
   one torch thread per task through ``TorchThreads(1)``, one warm-up task
   per worker before timing): wall time of ``fit_sharded`` (one shard per
   worker) and of ``score_samples_distributed`` on the test files (workers
   read their own files), and the work split: tasks and compute seconds per
   worker, from Dask's task stream. Distributed scores are compared bit for
   bit with the one-machine detector's ``score_samples`` on one torch thread,
   as the workers run.
3. **Accuracy against one machine**: the 2-worker sharded fit and
   ``fit(first half) + partial_fit(second half)``, each against the single
   fit on all images (which is also the refit): covering-radius ratio, image
   and pixel AUROC.

On a 2-core machine two workers can at best halve the wall time, and do
less: the client, the scheduler and the union pass share those cores, and
other jobs on the machine take their share. The split shows whether the
work was shared evenly; the speed-up is for machines with cores to spare.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from skpatchcore import EfficientNetLite0Extractor, ImageReader, PatchCoreDetector
from skpatchcore.coreset import ProjectedRows, covering_radius
from skpatchcore.datasets import load_mvtec
from skpatchcore.features import extract_patch_features
from skpatchcore.metrics import image_auroc, pixel_auroc
from skpatchcore.scoring import image_scores

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec"
SIZE = 256


def make_detector() -> PatchCoreDetector:
    return PatchCoreDetector(
        feature_extractor=EfficientNetLite0Extractor(), image_size=SIZE, algorithm="exact",
        random_state=0,
    )


def load(n_train: int):
    paths = load_mvtec(DATA, "bottle", image_size=SIZE, return_paths=True)
    keep = np.sort(np.random.RandomState(0).choice(len(paths.train_images), n_train, replace=False))
    data = load_mvtec(DATA, "bottle", image_size=SIZE)
    return {
        "train_paths": list(paths.train_images[keep]), "test_paths": list(paths.test_images),
        "train": data.train_images[keep], "test": data.test_images,
        "labels": data.test_labels, "masks": data.test_masks,
    }


def accuracy(det, data) -> tuple[float, float, float]:
    """Image and pixel AUROC on the test images, and the seconds per image they took."""
    start = time.perf_counter()
    maps, normality = det.anomaly_maps(data["test"], return_score_samples=True)
    per_image = (time.perf_counter() - start) / len(maps)
    return image_auroc(data["labels"], -normality), pixel_auroc(data["masks"], maps), per_image


def one_machine(data) -> dict:
    det = make_detector()
    start = time.perf_counter()
    det.fit(data["train"])
    fit_s = time.perf_counter() - start

    start = time.perf_counter()
    patches = extract_patch_features(
        det.feature_extractor_, data["train"], image_size=SIZE, embedding_dim=det.embedding_dim,
        batch_size=det.batch_size,
    )
    extract_s = (time.perf_counter() - start) / len(data["train"])
    features = patches.reshape(-1, patches.shape[-1])
    n_rows, dim = features.shape

    rows = ProjectedRows(n_rows, dim, projection_dim=128, dtype="float32", random_state=0,
                         device=torch.device("cpu"))
    rows.add(torch.from_numpy(features))
    start = time.perf_counter()
    rows.select(det.coreset_ratio)
    coreset_s = (time.perf_counter() - start) / n_rows

    test_patches = extract_patch_features(
        det.feature_extractor_, data["test"][:16], image_size=SIZE, embedding_dim=det.embedding_dim,
    )
    flat = test_patches.reshape(len(test_patches), -1, dim)
    image_scores(det.nn_index_, flat[:1], det.n_neighbors)  # warm-up
    start = time.perf_counter()
    image_scores(det.nn_index_, flat, det.n_neighbors)
    query_s = (time.perf_counter() - start) / flat.shape[0] / flat.shape[1]

    radius = covering_radius(features, det.memory_bank_)
    image, pixel, predict_s = accuracy(det, data)
    print(f"## One machine ({torch.get_num_threads()} torch threads)\n")
    print(f"fit on {len(data['train'])} images: {fit_s:.1f} s; bank {det.memory_bank_.shape}, "
          f"covering radius {radius:.4f}; image AUROC {image:.4f}, pixel AUROC {pixel:.4f}; "
          f"anomaly_maps {predict_s * 1e3:.0f} ms/image")
    print(f"constants: network {extract_s * 1e3:.1f} ms/image ({patches.shape[1]}x{patches.shape[2]} "
          f"patches); coreset {coreset_s * 1e6:.1f} us per training row (bank of "
          f"{det.coreset_ratio:.0%}, {n_rows} rows); exact search {query_s * 1e6:.2f} us per query "
          f"patch against {len(det.memory_bank_)} rows; bank row {4 * dim} B (float32), "
          f"{2 * dim} B (float16), {dim} dims\n")
    return {"det": det, "features": features, "radius": radius, "auroc": (image, pixel)}


def work_split(records, prefixes) -> str:
    busy, tasks = defaultdict(float), defaultdict(int)
    for record in records:
        if not record["key"].startswith(prefixes):
            continue
        for span in record["startstops"]:
            if span["action"] == "compute":
                busy[record["worker"]] += span["stop"] - span["start"]
        tasks[record["worker"]] += 1
    return ", ".join(
        f"worker {i}: {tasks[w]} tasks, {busy[w]:.1f} s compute" for i, w in enumerate(sorted(busy))
    )


def on_cluster(data, n_workers: int, single) -> PatchCoreDetector:
    from distributed import Client, LocalCluster, get_task_stream

    from skpatchcore.distributed import TorchThreads, fit_sharded, score_samples_distributed

    reader = ImageReader(image_size=SIZE)
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                      dashboard_address=None, silence_logs=logging.CRITICAL) as cluster, \
            Client(cluster) as client:
        client.register_plugin(TorchThreads(1))
        # Warm-up: imports, weights and kernels on each worker, outside the timings.
        warm = [client.submit(reader.transform, data["test_paths"][:1], pure=False, workers=[w])
                for w in client.scheduler_info(n_workers=-1)["workers"]]
        client.gather(warm)
        client.run(lambda: __import__("skpatchcore.distributed") and None)

        det = make_detector()
        with get_task_stream(client) as stream:
            start = time.perf_counter()
            fit_sharded(det, data["train_paths"], reader=reader, n_shards=n_workers)
            fit_s = time.perf_counter() - start
        fit_split = work_split(stream.data, ("_extract_shard", "summary", "_shard_leave_one_out"))

        with get_task_stream(client) as stream:
            start = time.perf_counter()
            scores = score_samples_distributed(single, data["test_paths"], reader=reader)
            score_s = time.perf_counter() - start
        # Bit for bit against one process with the workers' torch thread count: CPU
        # convolutions round differently with another (about 1e-6 relative).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        same = np.array_equal(scores, single.score_samples(reader.transform(data["test_paths"])))
        torch.set_num_threads(threads)
        print(f"## {n_workers} worker(s)\n")
        print(f"fit_sharded, {n_workers} shard(s): {fit_s:.1f} s ({fit_split})")
        print(f"score_samples_distributed, {len(scores)} files: {score_s:.1f} s, "
              f"{score_s / len(scores) * 1e3:.0f} ms/image ({work_split(stream.data, ('_score_part',))}); "
              f"equal to one process bit for bit: {same}\n")
    return det


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=100)
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    args = parser.parse_args(argv)
    data = load(args.n_train)
    single = one_machine(data)
    sharded = None
    for n_workers in args.workers:
        det = on_cluster(data, n_workers, single["det"])
        sharded = det if n_workers > 1 else sharded

    print("## Against one machine (ratio of covering radii over all training patches; AUROCs)\n")
    rows = []
    if sharded is not None:
        rows.append((f"fit_sharded, {max(args.workers)} shards", sharded))
    half = args.n_train // 2
    start = time.perf_counter()
    partial = make_detector().fit(data["train"][:half]).partial_fit(data["train"][half:])
    print(f"fit({half}) + partial_fit({args.n_train - half}): {time.perf_counter() - start:.1f} s "
          f"in this process\n")
    rows.append((f"fit({half}) + partial_fit({args.n_train - half}) vs refit({args.n_train})", partial))
    image0, pixel0 = single["auroc"]
    print("| detector | radius ratio | image AUROC | pixel AUROC |")
    print("| --- | :-: | :-: | :-: |")
    print(f"| one machine, fit({args.n_train}) | 1 | {image0:.4f} | {pixel0:.4f} |")
    for name, det in rows:
        ratio = covering_radius(single["features"], det.memory_bank_) / single["radius"]
        image, pixel, _ = accuracy(det, data)
        print(f"| {name} | {ratio:.3f} | {image:.4f} ({image - image0:+.4f}) | "
              f"{pixel:.4f} ({pixel - pixel0:+.4f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
