"""Peak memory of fitting and scoring at scale, each in a fresh process.

Fits ``PatchCoreDetector`` with a random-weight ``wide_resnet50_2`` (layers 2
and 3, ``embedding_dim=None``: 1,536-dim patch features, 28 x 28 patches per
224 x 224 image) on generated images, for each ``--fit-images`` count, and
prints the peak RSS of each fit next to the float32 size of all its patch
features, and the ratio of the largest fit's peak to the smallest's. The fit
streams the features batch by batch into a float16 store (a file in a
temporary folder beyond 1 GiB, written and read back a chunk at a time) and
projects them for the coreset as they come, so its peak should grow far
slower than the features.

Then it scores ``--score-images`` generated images in batches of
``--score-batch`` with a detector fitted on 20 of them, and prints the RSS
after the first 1,000 images and at the end, all of it and the process's own
allocations (``RssAnon``, without the pages of the image file read so far):
the latter should stay flat.

The images are written to a memory-mapped ``.npy`` file first and passed to
the detector as that array (its pages count in RSS once read, as they would
for a user's array); they are generated in chunks, never all in memory.

Usage::

    python benchmarks/memory.py                        # 1,000 and 10,000 images: long
    python benchmarks/memory.py --fit-images 100 400 --score-images 2000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from _rss import peak_rss_mib, rss_mib

PATCHES_PER_IMAGE, FEATURE_DIM = 28 * 28, 512 + 1024


def write_images(path: Path, n: int, size: int) -> None:
    """``n`` generated normal images into a ``.npy`` file, 200 at a time."""
    from skpatchcore.datasets import make_anomaly_images

    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    for i, start in enumerate(range(0, n, 200)):
        m = min(200, n - start)
        images, labels, _ = make_anomaly_images(2 * m, image_size=size, random_state=i)
        out[start : start + m] = images[labels == 0][:m]
    out.flush()


def detector(args):
    from skpatchcore import PatchCoreDetector, TorchvisionExtractor

    return PatchCoreDetector(
        feature_extractor=TorchvisionExtractor("wide_resnet50_2", weights=None),
        image_size=args["size"], embedding_dim=None, coreset_ratio=args["coreset_ratio"],
        random_state=0,
    )


def child_fit(args: dict) -> dict:
    import torch

    torch.manual_seed(0)  # the random weights
    images = np.load(args["images"], mmap_mode="r")
    det = detector(args)
    det.feature_extractor.load()  # the network's own memory, before the data
    base = rss_mib()
    det.fit(images)
    return {"base_mib": base, "peak_mib": peak_rss_mib(), "bank_rows": len(det.memory_bank_),
            "algorithm": det.nn_index_.algorithm_}


def child_score(args: dict) -> dict:
    import torch

    torch.manual_seed(0)
    images = np.load(args["images"], mmap_mode="r")
    det = detector(args).fit(np.asarray(images[:20]))
    after = {}
    for start in range(0, len(images), args["batch"]):
        det.score_samples(images[start : start + args["batch"]])
        done = min(start + args["batch"], len(images))
        if done >= 1000 and "first_1000" not in after:
            after["first_1000"] = (rss_mib(), rss_mib("RssAnon"))
    after["end"] = (rss_mib(), rss_mib("RssAnon"))
    return after


def run_child(kind: str, args: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, json.dumps(args)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--fit-images", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--score-images", type=int, default=10000)
    parser.add_argument("--score-batch", type=int, default=100)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    args = parser.parse_args(argv)
    if args.child:
        run = child_fit if args.child[0] == "fit" else child_score
        print(json.dumps(run(json.loads(args.child[1]))))
        return 0

    common = {"size": args.size, "coreset_ratio": args.coreset_ratio}
    peaks = {}
    print(f"# wide_resnet50_2 (random weights), {args.size}x{args.size}, embedding_dim=None, "
          f"coreset_ratio={args.coreset_ratio}")
    print("| images | fp32 patch features (MiB) | RSS before fit (MiB) | peak RSS (MiB) "
          "| peak / features | bank rows | search |\n|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="skpatchcore-memory-") as tmp:
        for n in args.fit_images:
            path = Path(tmp) / f"fit-{n}.npy"
            write_images(path, n, args.size)
            result = run_child("fit", {**common, "images": str(path)})
            path.unlink()
            features = n * PATCHES_PER_IMAGE * FEATURE_DIM * 4 / 2**20
            peaks[n] = result["peak_mib"]
            print(f"| {n} | {features:.0f} | {result['base_mib']:.0f} | {result['peak_mib']:.0f} "
                  f"| {result['peak_mib'] / features:.2f} | {result['bank_rows']} | {result['algorithm']} |",
                  flush=True)
        if len(peaks) > 1:
            small, large = min(peaks), max(peaks)
            print(f"\npeak RSS, {large} images / {small} images: {peaks[large] / peaks[small]:.2f}x "
                  f"(features: {large / small:.0f}x)")
        path = Path(tmp) / "score.npy"
        write_images(path, args.score_images, args.size)
        result = run_child("score", {**common, "images": str(path), "batch": args.score_batch})
        first = result.get("first_1000", (float("nan"),) * 2)
        print(f"\nscoring {args.score_images} images in batches of {args.score_batch}: RSS (own "
              f"allocations, without the image file's pages) after 1,000 images {first[0]:.0f} "
              f"({first[1]:.0f}) MiB, at the end {result['end'][0]:.0f} ({result['end'][1]:.0f}) MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
