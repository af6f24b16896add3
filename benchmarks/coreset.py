"""GreedyCoresetSampler against a straightforward greedy k-center, on real and synthetic features.

    python benchmarks/coreset.py [--quick]

Datasets (coreset ratio 0.1, projection to 128 dimensions, seed 0):

* bottle: EfficientNet-Lite0 patch features (blocks.2 + blocks.4, 256x256 input,
  32x32 patches of 152 dims per image) of the first 100 MVTec AD bottle training
  images, read from ../shared/data (never copied here): 102,400 x 152.
* synthetic: 150,000 x 1536 ReLU features of a random 16-dimensional latent
  manifold plus noise (``relu(u W + b) + 0.05 e``), a stand-in for wide CNN
  features. The reference's loop is timed on a prefix of its centres and
  extrapolated linearly (every centre costs it one identical pass; its
  projection is timed in full), and both radii are compared on the first
  30,000 rows, where the reference runs to the end.

``--quick`` uses 20 images, 40,000 synthetic rows (radii on 10,000) and a
400-centre prefix.

The reference projects with the same Gaussian matrix and starts from the same
row as ours, then makes one vectorised pass over the projection per centre
(``|x|^2 - 2 x.c + |c|^2`` by matrix-vector product, as fast as a plain loop
gets); it runs with the faster of 1 and 2 torch threads, ours with its own
setting (one thread). Each fit runs in a fresh spawned process: time is the
whole fit, projection included; memory is the peak RSS (VmHWM, reset right
before the fit) above the RSS right after loading the features, with torch
warmed up first in both. Radii are coverage radii in the original feature
space, the largest distance of a row to its nearest selected row, computed in
chunks.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np
from _rss import rss_mib

BOTTLE = Path(__file__).resolve().parents[2] / "shared/data/mvtec/bottle/train/good"
RATIO, PROJECTION_DIM, SEED = 0.1, 128, 0


def reference_greedy(
    X: np.ndarray, n_centers: int, random_state: int, max_passes: int | None = None
) -> tuple[np.ndarray, float | None, int, float]:
    """Plain greedy k-center on a Gaussian projection: one full pass per centre.

    Seeds its projection and start exactly as :class:`GreedyCoresetSampler`
    does. Stops after ``max_passes`` passes when given (for timing a prefix).
    Returns the selected indices, the projected coverage radius (None when
    stopped early), the number of passes made and the seconds they took.
    """
    import torch
    from sklearn.random_projection import GaussianRandomProjection
    from sklearn.utils import check_random_state

    rng = check_random_state(random_state)
    projection = GaussianRandomProjection(
        PROJECTION_DIM, random_state=rng.randint(np.iinfo(np.int32).max)
    ).fit(X[:1])
    start = int(rng.randint(len(X)))
    Z = torch.from_numpy(X) @ torch.from_numpy(projection.components_.T)
    sq_norms = Z.pow(2).sum(1)
    min_sq = torch.full((len(X),), math.inf)
    chosen, idx = [start], start
    passes = n_centers if max_passes is None else min(n_centers, max_passes)
    loop_start = time.perf_counter()
    for i in range(passes):
        d = torch.addmv(sq_norms, Z, Z[idx], alpha=-2).add_(sq_norms[idx]).clamp_(min=0)
        torch.minimum(min_sq, d, out=min_sq)
        if i + 1 < n_centers:
            idx = int(min_sq.argmax())
            chosen.append(idx)
    loop_seconds = time.perf_counter() - loop_start
    radius = math.sqrt(float(min_sq.max())) if passes == n_centers else None
    return np.array(chosen[:n_centers]), radius, passes, loop_seconds


def _run(job: dict) -> dict:
    """One timed fit in this (fresh) process."""
    import torch

    from skpatchcore.coreset import GreedyCoresetSampler

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    # Load torch's kernels before the baseline, so neither method is charged for them.
    warm = torch.randn(512, 160)
    torch.topk((warm @ warm.T).sum(1), 8)
    torch.addmv(warm[:, 0], warm, warm[0])
    X = np.load(job["path"])
    if job.get("rows"):
        X = np.ascontiguousarray(X[: job["rows"]])
    n_centers = max(1, math.ceil(round(RATIO * len(X), 6)))
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # restart the peak (VmHWM) from the current RSS
    base = rss_mib("VmRSS")
    start = time.perf_counter()
    if job["method"] == "ours":
        sampler = GreedyCoresetSampler(
            coreset_ratio=RATIO, projection_dim=PROJECTION_DIM, random_state=SEED
        ).fit(X)
        indices, radius = sampler.indices_, sampler.radius_
        seconds = time.perf_counter() - start
    else:
        indices, radius, passes, loop = reference_greedy(X, n_centers, SEED, job.get("max_passes"))
        # Every pass costs the same: extrapolate the loop, not the projection before it.
        seconds = time.perf_counter() - start + loop * (n_centers / passes - 1)
    extra = (rss_mib("VmHWM") - base) * 2**20
    return dict(
        indices=indices, seconds=seconds, n_centers=n_centers, extra_rss=extra,
        input_bytes=X.nbytes, radius_projected=radius, shape=X.shape,
    )


def run_fresh(**job) -> dict:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_run, (job,))


def coverage_radius(X: np.ndarray, indices: np.ndarray, rows: np.ndarray | None = None) -> float:
    """Largest distance of a row (of ``rows``, default all) to its nearest selected row."""
    import torch

    X = torch.from_numpy(X)
    mean = X[: min(len(X), 50_000)].mean(0)
    centres = X[torch.from_numpy(indices)] - mean
    centres_sq = centres.pow(2).sum(1)
    queries = torch.arange(len(X)) if rows is None else torch.from_numpy(rows)
    worst = 0.0
    step = max(1, (1 << 24) // len(centres))
    for lo in range(0, len(queries), step):
        q = X[queries[lo : lo + step]] - mean
        d = torch.addmm(centres_sq, q, centres.T, alpha=-2).amin(1) + q.pow(2).sum(1)
        worst = max(worst, float(d.max()))
    return math.sqrt(max(worst, 0.0))


def bottle_features(n_images: int) -> np.ndarray:
    from skpatchcore.datasets import load_folder
    from skpatchcore.features import EfficientNetLite0Extractor, extract_patch_features

    images = load_folder(BOTTLE).images[:n_images]
    patches = extract_patch_features(EfficientNetLite0Extractor(), images, image_size=256)
    return patches.reshape(-1, patches.shape[-1])


def synthetic_features(n: int, dim: int = 1536, latent: int = 16) -> np.ndarray:
    rng = np.random.RandomState(SEED)
    W = rng.normal(size=(latent, dim)).astype(np.float32) / np.sqrt(latent)
    b = rng.normal(scale=0.5, size=dim).astype(np.float32)
    X = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, 10_000):
        u = rng.normal(size=(min(10_000, n - lo), latent)).astype(np.float32)
        X[lo : lo + len(u)] = np.maximum(u @ W + b, 0) + 0.05 * rng.normal(size=(len(u), dim))
    return X


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sets (20 images, 40k rows)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # feature extraction and radii: steady timings on a busy machine
    if args.quick:
        n_images, n_synth, n_small, prefix = 20, 40_000, 10_000, 400
    else:
        n_images, n_synth, n_small, prefix = 100, 150_000, 30_000, 1500
    rows, notes = [], []

    with tempfile.TemporaryDirectory() as tmp:
        if not BOTTLE.is_dir():
            raise SystemExit(f"MVTec bottle images not found at {BOTTLE}")
        start = time.perf_counter()
        bottle = bottle_features(n_images)
        print(
            f"bottle: {bottle.shape[0]} x {bottle.shape[1]} Lite0 patch features of "
            f"{n_images} images in {time.perf_counter() - start:.1f} s",
            flush=True,
        )
        bottle_path = f"{tmp}/bottle.npy"
        np.save(bottle_path, bottle)

        probe = {
            t: run_fresh(method="reference", path=bottle_path, max_passes=300, threads=t)
            for t in (1, 2)
        }
        threads = min(probe, key=lambda t: probe[t]["seconds"])
        notes.append(
            "reference, whole fit extrapolated from 300 centres on bottle: "
            + ", ".join(f"{t} thread(s) {p['seconds']:.1f} s" for t, p in probe.items())
            + f"; using {threads}"
        )

        ref = run_fresh(method="reference", path=bottle_path, threads=threads)
        ours = run_fresh(method="ours", path=bottle_path)
        for name, r in (("reference", ref), ("ours", ours)):
            r["radius"] = coverage_radius(bottle, r["indices"])
            rows.append(("bottle", name, r, ""))
        overlap_bottle = len(np.intersect1d(ref["indices"], ours["indices"])) / len(ours["indices"])
        del bottle

        synth = synthetic_features(n_synth)
        synth_path = f"{tmp}/synthetic.npy"
        np.save(synth_path, synth)
        ref_s = run_fresh(method="reference", path=synth_path, max_passes=prefix, threads=threads)
        ours_s = run_fresh(method="ours", path=synth_path)
        sample = np.random.RandomState(SEED).choice(n_synth, n_synth // 20, replace=False)
        ours_s["radius"] = coverage_radius(synth, ours_s["indices"], rows=sample)
        ref_s["radius"] = None
        rows.append(("synthetic", "reference", ref_s, f"time extrapolated from {prefix} centres"))
        rows.append(("synthetic", "ours", ours_s, "radius: max over 5% sampled rows"))

        small = np.ascontiguousarray(synth[:n_small])
        ref_m = run_fresh(method="reference", path=synth_path, rows=n_small, threads=threads)
        ours_m = run_fresh(method="ours", path=synth_path, rows=n_small)
        for name, r in (("reference", ref_m), ("ours", ours_m)):
            r["radius"] = coverage_radius(small, r["indices"])
            rows.append((f"synthetic[:{n_small}]", name, r, ""))
        shared = np.intersect1d(ref_m["indices"], ours_m["indices"])
        overlap_small = len(shared) / len(ours_m["indices"])

    mib = 1 << 20
    print()
    header = (f"{'dataset':<18} {'method':<10} {'rows x dims':>14} {'centres':>8} {'time s':>9} "
              f"{'peak RSS MiB':>12} {'/input':>7} {'radius':>8} {'radius 128d':>11}  note")
    print(header)
    print("-" * len(header))
    for dataset, name, r, note in rows:
        radius = "-" if r["radius"] is None else f"{r['radius']:.3f}"
        proj = "-" if r["radius_projected"] is None else f"{r['radius_projected']:.3f}"
        shape = f"{r['shape'][0]} x {r['shape'][1]}"
        print(f"{dataset:<18} {name:<10} {shape:>14} {r['n_centers']:>8} {r['seconds']:>9.2f} "
              f"{r['extra_rss'] / mib:>12.1f} {r['extra_rss'] / r['input_bytes']:>7.2f} "
              f"{radius:>8} {proj:>11}  {note}")
    print()
    for note in notes:
        print(note)
    print(f"selected rows shared with the reference: bottle {overlap_bottle:.1%}, "
          f"synthetic[:{n_small}] {overlap_small:.1%}")
    print()
    print("ratios (reference / ours for time, ours / reference for radius and memory):")
    print(f"  speed-up      bottle {ref['seconds'] / ours['seconds']:.1f}x   "
          f"synthetic {ref_s['seconds'] / ours_s['seconds']:.1f}x (reference extrapolated)   "
          f"synthetic[:{n_small}] {ref_m['seconds'] / ours_m['seconds']:.1f}x")
    print(f"  radius ratio  bottle {ours['radius'] / ref['radius']:.4f}   "
          f"synthetic[:{n_small}] {ours_m['radius'] / ref_m['radius']:.4f}   "
          "(original feature space)")
    print(f"  memory ratio  bottle {ours['extra_rss'] / max(ref['extra_rss'], 1):.2f}   "
          f"synthetic {ours_s['extra_rss'] / max(ref_s['extra_rss'], 1):.2f}   "
          f"(peak RSS above the loaded features; ours / input: bottle "
          f"{ours['extra_rss'] / ours['input_bytes']:.2f}, synthetic "
          f"{ours_s['extra_rss'] / ours_s['input_bytes']:.2f})")


if __name__ == "__main__":
    main()
