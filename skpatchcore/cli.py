"""The ``skpatchcore`` command line.

``skpatchcore benchmark`` fits a :class:`~skpatchcore.PatchCoreDetector` on
the good training images of MVTec AD categories, evaluates it on their test
split and prints the results as Markdown tables in anomalib's benchmark
format (one row per backbone, one column per category after the average),
with fit time, prediction time and peak memory. ``--output`` also writes them
as CSV and JSON, and ``--heatmaps`` the anomaly maps overlaid on the test
images.

Examples
--------
.. code-block:: console

    $ skpatchcore benchmark --root mvtec --category bottle --backbone efficientnet_lite0
    $ skpatchcore benchmark --root mvtec --category bottle cable \\
          --backbone wide_resnet50_2 resnet18 --output results --heatmaps -v
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .datasets import load_mvtec
from .detector import PatchCoreDetector
from .display import AnomalyMapDisplay
from .features import EfficientNetLite0Extractor, TorchvisionExtractor
from .metrics import aupro, image_auroc, image_f1_max, pixel_auroc
from .progress import log

__all__ = ["main", "format_results"]

#: How backbones are named in the tables (others appear as given).
BACKBONE_TITLES = {
    "wide_resnet50_2": "Wide ResNet-50",
    "wide_resnet101_2": "Wide ResNet-101",
    "resnet18": "ResNet-18",
    "resnet34": "ResNet-34",
    "resnet50": "ResNet-50",
    "efficientnet_lite0": "EfficientNet-Lite0",
}

# (result key, table title, number format): one Markdown table each.
_TABLES = (
    ("image_auroc", "Image-Level AUC", "{:.3f}"),
    ("pixel_auroc", "Pixel-Level AUC", "{:.3f}"),
    ("image_f1", "Image F1 Score", "{:.3f}"),
    ("aupro", "Pixel-Level AUPRO", "{:.3f}"),
    ("fit_time_s", "Fit Time (s)", "{:.1f}"),
    ("predict_time_ms", "Predict Time per Image (ms)", "{:.1f}"),
    ("peak_memory_mib", "Peak Memory (MiB)", "{:.0f}"),
)


# --------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or a positive integer, got {text}")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skpatchcore",
        description="PatchCore anomaly detection (Roth et al., CVPR 2022) with scikit-learn.",
    )
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_benchmark_command(subcommands)
    return parser


def _add_benchmark_command(subcommands) -> None:
    bench = subcommands.add_parser(
        "benchmark",
        help="fit and evaluate PatchCore on MVTec AD categories",
        description=(
            "Fit PatchCore on train/good of each MVTec AD category, evaluate it on "
            "the test split and print image AUROC, pixel AUROC, image F1 (at the best "
            "threshold) and AUPRO (FPR <= 0.3), with fit time, prediction time per "
            "image and the process's peak memory."
        ),
    )
    bench.add_argument(
        "--root", required=True, type=Path, help="folder holding the MVTec AD category folders"
    )
    bench.add_argument(
        "--category",
        required=True,
        nargs="+",
        action="extend",
        help="category folder name(s), e.g. bottle; repeatable",
    )
    bench.add_argument(
        "--backbone",
        nargs="+",
        action="extend",
        help="torchvision model name(s) or efficientnet_lite0; repeatable "
        "(default: wide_resnet50_2)",
    )
    bench.add_argument(
        "--layers",
        nargs="+",
        help="feature layers (default: layer2 layer3 for torchvision, "
        "blocks.2 blocks.4 for efficientnet_lite0)",
    )
    bench.add_argument(
        "--weights",
        help="'none' for random weights, a weights name (torchvision: DEFAULT, "
        "IMAGENET1K_V1, ...; efficientnet_lite0: imagenet) or a local state-dict "
        "file (default: the ImageNet weights)",
    )
    bench.add_argument(
        "--coreset-ratio",
        type=_ratio,
        default=0.1,
        help="fraction of patches kept in the memory bank (default: 0.1)",
    )
    bench.add_argument(
        "--image-size", type=_positive_int, default=256, help="size the network sees (default: 256)"
    )
    bench.add_argument(
        "--load-size",
        type=_non_negative_int,
        default=256,
        help="resize images and masks to this size when loading, which "
        "is also the resolution of the pixel metrics; 0 keeps the "
        "files' size (default: 256)",
    )
    bench.add_argument(
        "--n-train",
        type=_positive_int,
        help="fit on the first N training images only (default: all)",
    )
    bench.add_argument("--random-state", type=int, default=0, help="seed (default: 0)")
    bench.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    bench.add_argument(
        "--output", type=Path, help="folder for results.csv, results.json and heatmaps/"
    )
    bench.add_argument(
        "--heatmaps",
        action="store_true",
        help="save anomaly-map overlays of the test images (needs --output)",
    )
    bench.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="print progress; errors also show their traceback",
    )
    bench.set_defaults(func=_run_benchmark)


# --------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------


def _make_extractor(backbone: str, layers, weights):
    """The feature extractor for a ``--backbone`` name and the options."""
    options = {}
    if layers:
        options["layers"] = tuple(layers)
    if weights is not None:
        options["weights"] = None if weights.lower() == "none" else weights
    if backbone == "efficientnet_lite0":
        return EfficientNetLite0Extractor(**options)
    return TorchvisionExtractor(backbone, **options)


def _peak_memory_mib() -> float:
    """Peak resident memory of this process so far (``ru_maxrss``), in MiB."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024**2 if sys.platform == "darwin" else 1024)


def _log(args, message: str) -> None:
    # Through logging, on stderr: the tables on stdout stay clean.
    log(message, args.verbose)


def _evaluate(args, backbone: str, data) -> tuple[dict, np.ndarray, float]:
    """Fit on ``data.train_images``, score the test split; return results, maps and pixel threshold."""
    detector = PatchCoreDetector(
        feature_extractor=_make_extractor(backbone, args.layers, args.weights),
        image_size=args.image_size,
        coreset_ratio=args.coreset_ratio,
        random_state=args.random_state,
        device=args.device,
        verbose=args.verbose,
    )
    _log(args, f"[{data.category}] {backbone}: fitting on {len(data.train_images)} images")
    start = time.perf_counter()
    detector.fit(data.train_images)
    fit_time = time.perf_counter() - start

    _log(args, f"[{data.category}] {backbone}: scoring {len(data.test_images)} test images")
    start = time.perf_counter()
    maps, score_samples = detector.anomaly_maps(data.test_images, return_score_samples=True)
    predict_time = time.perf_counter() - start

    # score_samples is higher for normal images; the metrics want anomaly scores.
    scores = -score_samples
    result = {
        "backbone": backbone,
        "category": data.category,
        "image_auroc": image_auroc(data.test_labels, scores),
        "pixel_auroc": pixel_auroc(data.test_masks, maps),
        "image_f1": image_f1_max(data.test_labels, scores),
        "aupro": aupro(data.test_masks, maps),
        "fit_time_s": fit_time,
        "predict_time_ms": 1000 * predict_time / len(data.test_images),
        "peak_memory_mib": _peak_memory_mib(),
        "n_train": len(data.train_images),
        "n_test": len(data.test_images),
    }
    return result, maps, detector.pixel_threshold_


def _run_benchmark(args) -> int:
    if args.heatmaps and args.output is None:
        print("skpatchcore benchmark: error: --heatmaps needs --output", file=sys.stderr)
        return 2
    backbones = args.backbone or ["wide_resnet50_2"]
    results = []
    try:
        for category in args.category:
            _log(args, f"[{category}] loading from {args.root}")
            data = load_mvtec(args.root, category, image_size=args.load_size or None)
            if args.n_train is not None:
                data.train_images = data.train_images[: args.n_train]
            for backbone in backbones:
                result, maps, threshold = _evaluate(args, backbone, data)
                results.append(result)
                if args.heatmaps:
                    folder = args.output / "heatmaps" / backbone / category
                    _save_heatmaps(folder, data, maps, threshold)
                    _log(args, f"[{category}] {backbone}: heatmaps in {folder}")
    except (OSError, ValueError, RuntimeError, ImportError) as exc:
        if args.verbose:
            raise
        print(f"skpatchcore benchmark: error: {exc}", file=sys.stderr)
        return 1

    print(format_results(results))
    if args.output is not None:
        _write_results(args, results)
        _log(args, f"results written to {args.output}")
    return 0


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


def _title(category: str) -> str:
    return category.replace("_", " ").title()


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Markdown table lines: first column left-aligned, the others centred."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells):
        padded = [cells[0].ljust(widths[0])]
        padded += [cell.center(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "| "
        + " | ".join(["-" * widths[0]] + [":" + "-" * (w - 2) + ":" for w in widths[1:]])
        + " |"
    )
    return [line(header), rule] + [line(row) for row in rows]


def format_results(results: Sequence[dict]) -> str:
    """Benchmark results as Markdown tables, one per metric.

    Parameters
    ----------
    results : sequence of dict
        One dict per (backbone, category) run, with the keys ``backbone``,
        ``category`` and the metrics ``image_auroc``, ``pixel_auroc``,
        ``image_f1``, ``aupro``, ``fit_time_s``, ``predict_time_ms`` and
        ``peak_memory_mib``.

    Returns
    -------
    text : str
        A ``### <metric>`` heading and a table per metric: one row per
        backbone, columns ``Avg`` (mean over categories) and each category.

    Examples
    --------
    >>> from skpatchcore.cli import format_results
    >>> row = dict(backbone="resnet18", category="bottle", image_auroc=1.0,
    ...            pixel_auroc=0.98, image_f1=1.0, aupro=0.9, fit_time_s=12.0,
    ...            predict_time_ms=150.0, peak_memory_mib=2048.0)
    >>> for line in format_results([row]).splitlines()[:5]:
    ...     print(line)
    ### Image-Level AUC
    <BLANKLINE>
    |           |  Avg  | Bottle |
    | --------- | :---: | :----: |
    | ResNet-18 | 1.000 | 1.000  |
    """
    backbones = list(dict.fromkeys(r["backbone"] for r in results))
    categories = list(dict.fromkeys(r["category"] for r in results))
    by_run = {(r["backbone"], r["category"]): r for r in results}
    header = ["", "Avg"] + [_title(c) for c in categories]
    blocks = []
    for key, title, fmt in _TABLES:
        rows = []
        for backbone in backbones:
            values = [
                by_run[backbone, c][key] if (backbone, c) in by_run else np.nan for c in categories
            ]
            cells = [fmt.format(v) if np.isfinite(v) else "-" for v in values]
            rows.append(
                [BACKBONE_TITLES.get(backbone, backbone), fmt.format(np.nanmean(values)), *cells]
            )
        blocks.append("\n".join([f"### {title}", "", *_markdown_table(header, rows)]))
    return "\n\n".join(blocks)


def _write_results(args, results: Sequence[dict]) -> None:
    args.output.mkdir(parents=True, exist_ok=True)
    with open(args.output / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    settings = {
        name: str(value) if isinstance(value, Path) else value
        for name, value in vars(args).items()
        if name not in ("func", "command")
    }
    settings["backbone"] = list(dict.fromkeys(r["backbone"] for r in results))
    averages = {
        backbone: {
            key: float(np.mean([r[key] for r in results if r["backbone"] == backbone]))
            for key, _, _ in _TABLES
        }
        for backbone in settings["backbone"]
    }
    document = {"settings": settings, "results": list(results), "averages": averages}
    (args.output / "results.json").write_text(json.dumps(document, indent=2) + "\n")


def _save_heatmaps(folder: Path, data, maps: np.ndarray, threshold: float) -> None:
    """Write ``<defect type>_<name>.png``: each test image with its map and outlines.

    Drawn by :class:`~skpatchcore.display.AnomalyMapDisplay`; the maps share
    one colour scale per category (its test maps' min to max), so colours
    compare across images. The predicted defect (map above the detector's
    ``pixel_threshold_``) is outlined in white, the ground truth in green.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no window, works on headless machines
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    scale = {"vmin": float(maps.min()), "vmax": float(maps.max())}
    for image, heat, mask, defect, filename in zip(
        data.test_images,
        maps,
        data.test_masks,
        data.test_defect_types,
        data.test_filenames,
        strict=True,
    ):
        display = AnomalyMapDisplay.from_predictions(
            image[None], heat[None], threshold=threshold, masks=mask[None], **scale
        )
        display.figure_.savefig(folder / f"{defect}_{Path(filename).stem}.png", dpi=80)
        plt.close(display.figure_)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``skpatchcore`` command line.

    Parameters
    ----------
    argv : sequence of str or None, default=None
        Arguments after the program name; None reads ``sys.argv``.

    Returns
    -------
    status : int
        0 on success, 1 when the run failed (the error is printed), 2 for
        invalid arguments.

    Examples
    --------
    >>> from skpatchcore.cli import main
    >>> main(["benchmark", "--root", "mvtec", "--category", "bottle",
    ...       "--backbone", "efficientnet_lite0"])  # doctest: +SKIP
    """
    args = _build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
