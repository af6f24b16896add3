"""The "accurate" preset's cost against the "fast" one's, each in a fresh process.

    python benchmarks/presets.py [--categories bottle screw] [--n-train 100] [--maps-images 20] [--repeats 3]

For each category under ``../shared/data`` (read there, never copied here;
by default every category found: the dev set of issue 9), both presets of
:mod:`skpatchcore.presets` fit on the same ``--n-train`` training images (the
seeded choice of ``skpatchcore benchmark``), files at their own resolution,
then score the whole test split with ``score_samples`` (image scores only),
and the first ``--maps-images`` test images with ``anomaly_maps`` (a full
nearest-neighbour search per patch: at 512 px, seconds per tall KolektorSDD
image). Each run is a fresh Python process, so its peak RSS is its own; the
two presets alternate within a category (fast, accurate; ``--repeats`` pairs),
so machine drift is shared. Printed per category: fit time, ``score_samples``
and ``anomaly_maps`` time per image, peak RSS, image AUROC (medians over the
repeats), and the ratios of the medians, accurate / fast (the target of
issue 9: at most 4x in time). One pair is not enough on a shared machine:
the fast preset's ``score_samples`` on MVTec transistor read 8.6 ms in one
run and 12.4 ms in the next.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _rss import peak_rss_mib

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def child(args: dict) -> dict:
    """Fit one preset on one category and time its scoring."""
    from skpatchcore.cli import _training_subset, find_categories
    from skpatchcore.datasets import load_mvtec
    from skpatchcore.metrics import image_auroc
    from skpatchcore.presets import make_detector

    folder = next(c for c in find_categories(args["root"]) if c.split("/")[-1] == args["category"])
    data = load_mvtec(args["root"], folder, image_size=None)
    train = _training_subset(data.train_images, args["n_train"], 0)
    det = make_detector(args["preset"], random_state=0)
    start = time.perf_counter()
    det.fit(train)
    fit = time.perf_counter() - start
    start = time.perf_counter()
    scores = det.score_samples(data.test_images)
    score_ms = 1000 * (time.perf_counter() - start) / len(data.test_images)
    start = time.perf_counter()
    maps_images = data.test_images[: args["maps_images"]]
    det.anomaly_maps(maps_images)
    maps_ms = 1000 * (time.perf_counter() - start) / len(maps_images)
    return {
        "fit_s": fit,
        "score_ms": score_ms,
        "maps_ms": maps_ms,
        "peak_mib": peak_rss_mib(),
        "image_auroc": image_auroc(data.test_labels, -scores),
    }


def run_child(args: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(args)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_row(category: str, label: str, values: dict, columns) -> None:
    cells = " | ".join(f"{values[c]:.4g}" for c in columns)
    print(f"| {category} | {label} | {cells} |", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, default=DATA)
    parser.add_argument("--categories", nargs="+", help="category folder names (default: every one found)")
    parser.add_argument("--n-train", type=int, default=100)
    parser.add_argument("--maps-images", type=int, default=20, help="test images timed with anomaly_maps")
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process pairs (fast, accurate) per category")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if not args.root.is_dir():
        print(f"no data at {args.root} (see ../shared/data/README.md)", file=sys.stderr)
        return 1
    columns = ("fit_s", "score_ms", "maps_ms", "peak_mib", "image_auroc")
    print(f"| category | preset | {' | '.join(columns)} |")
    print("|---|---|" + "---|" * len(columns))
    from skpatchcore.cli import find_categories

    categories = args.categories or [folder.split("/")[-1] for folder in find_categories(args.root)]
    for category in categories:
        runs = {"fast": [], "accurate": []}
        for _ in range(args.repeats):
            for preset, done in runs.items():
                job = {
                    "root": str(args.root), "category": category, "preset": preset,
                    "n_train": args.n_train, "maps_images": args.maps_images,
                }
                done.append(run_child(job))
                print_row(category, preset, done[-1], columns)
        medians = {preset: {c: statistics.median(run[c] for run in done) for c in columns} for preset, done in runs.items()}
        for preset, median in medians.items():
            print_row(category, f"{preset}, median", median, columns)
        ratios = " | ".join(
            f"{medians['accurate'][c] / medians['fast'][c]:.2f}x" if c != "image_auroc"
            else f"{medians['accurate'][c] - medians['fast'][c]:+.3f}"
            for c in columns
        )
        print(f"| {category} | accurate / fast | {ratios} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
