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
from .presets import PRESETS, make_detector
from .progress import log

__all__ = ["main", "format_results", "find_categories"]

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
    which = bench.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--category",
        nargs="+",
        action="extend",
        help="category folder(s) under --root, e.g. bottle or mvtec/bottle; repeatable",
    )
    which.add_argument(
        "--all",
        action="store_true",
        help="every category found: each folder with train/good, one or two levels "
        "under --root",
    )
    model = bench.add_mutually_exclusive_group()
    model.add_argument(
        "--backbone",
        nargs="+",
        action="extend",
        help="torchvision model name(s) or efficientnet_lite0; repeatable "
        "(default: wide_resnet50_2)",
    )
    model.add_argument(
        "--config",
        nargs="+",
        action="extend",
        choices=sorted(PRESETS),
        help="named configuration(s) from skpatchcore.presets, one table row each; "
        "their own settings replace --layers, --weights, --image-size and --coreset-ratio",
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
        help="fit on N training images drawn at random with --random-state, the same "
        "ones for every configuration (default: all)",
    )
    bench.add_argument(
        "--algorithm",
        choices=("auto", "exact", "pynndescent"),
        help="nearest-neighbour backend (default: auto, or a --config preset's own)",
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


def find_categories(root) -> list[str]:
    """Category folders under ``root``: those holding ``train/good``, one or two levels down.

    Parameters
    ----------
    root : str or path-like

    Returns
    -------
    categories : list of str
        Paths relative to ``root`` with "/" separators (``"bottle"`` or
        ``"mvtec/bottle"``), sorted.

    Examples
    --------
    >>> from skpatchcore.cli import find_categories
    >>> find_categories("../shared/data")  # doctest: +SKIP
    ['kolektorsdd/commutator', 'mvtec/bottle', 'mvtec/screw', 'mvtec/transistor']
    """
    root = Path(root)
    found = [p.parents[1] for pattern in ("*/train/good", "*/*/train/good") for p in root.glob(pattern)]
    return sorted(p.relative_to(root).as_posix() for p in found if p.is_dir())


def _make_detector(args, run: str):
    """The detector of one table row: a ``--config`` preset or a ``--backbone``."""
    common = dict(random_state=args.random_state, device=args.device, verbose=args.verbose)
    if args.algorithm is not None:  # else a preset keeps its own ("accurate": exact)
        common["algorithm"] = args.algorithm
    if args.config:
        return make_detector(run, **common)
    return PatchCoreDetector(
        feature_extractor=_make_extractor(run, args.layers, args.weights),
        image_size=args.image_size,
        coreset_ratio=args.coreset_ratio,
        **common,
    )


def _training_subset(images: np.ndarray, n_train: int | None, random_state: int) -> np.ndarray:
    """``n_train`` images drawn without replacement by a seeded choice, in file order."""
    if n_train is None or n_train >= len(images):
        return images
    keep = np.random.RandomState(random_state).choice(len(images), n_train, replace=False)
    return images[np.sort(keep)]


def _evaluate(args, backbone: str, data) -> tuple[dict, np.ndarray, float]:
    """Fit on ``data.train_images``, score the test split; return results, maps and pixel threshold.

    Categories without masks (``data.test_masks`` None) get NaN pixel metrics.
    """
    detector = _make_detector(args, backbone)
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
    masks = data.test_masks
    result = {
        "backbone": backbone,
        "category": data.category,
        "image_auroc": image_auroc(data.test_labels, scores),
        "pixel_auroc": np.nan if masks is None else pixel_auroc(masks, maps),
        "image_f1": image_f1_max(data.test_labels, scores),
        "aupro": np.nan if masks is None else aupro(masks, maps),
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
    runs = args.config or args.backbone or ["wide_resnet50_2"]
    categories = find_categories(args.root) if args.all else args.category
    if not categories:
        print(
            f"skpatchcore benchmark: error: no category (a folder with train/good) found "
            f"one or two levels under {args.root}",
            file=sys.stderr,
        )
        return 1
    results = []
    try:
        for category in categories:
            _log(args, f"[{category}] loading from {args.root}")
            data = load_mvtec(args.root, category, image_size=args.load_size or None)
            data.train_images = _training_subset(data.train_images, args.n_train, args.random_state)
            for backbone in runs:
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
    """Column title: the category folder's own name, e.g. "mvtec/metal_nut" -> "Metal Nut"."""
    return category.rsplit("/", 1)[-1].replace("_", " ").title()


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


def _mean(values) -> float | None:
    """Mean over the categories that have the metric; None when none has it."""
    values = np.asarray(values, dtype=float)
    return float(values[np.isfinite(values)].mean()) if np.isfinite(values).any() else None


def _mean_cell(values, fmt: str) -> str:
    mean = _mean(values)
    return "-" if mean is None else fmt.format(mean)


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
        backbone or configuration, columns ``Avg`` (mean over the categories
        that have the metric) and each category. A missing run or metric
        (pixel metrics of a category without masks) prints "-".

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
                [BACKBONE_TITLES.get(backbone, backbone), _mean_cell(values, fmt), *cells]
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
            key: _mean([r[key] for r in results if r["backbone"] == backbone])
            for key, _, _ in _TABLES
        }
        for backbone in settings["backbone"]
    }
    # NaN (pixel metrics of mask-less categories) is not JSON: written as null.
    results = [{k: None if v is not None and v != v else v for k, v in r.items()} for r in results]
    document = {"settings": settings, "results": results, "averages": averages}
    (args.output / "results.json").write_text(json.dumps(document, indent=2) + "\n")


def _save_heatmaps(folder: Path, data, maps: np.ndarray, threshold: float) -> None:
    """Write ``<defect type>_<name>.png``: each test image with its map and outlines.

    Drawn by :class:`~skpatchcore.display.AnomalyMapDisplay`; the maps share
    one colour scale per category (its test maps' min to max), so colours
    compare across images. The predicted defect (map above the detector's
    ``pixel_threshold_``) is outlined in white, the ground truth, where the
    category has masks, in green.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no window, works on headless machines
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    scale = {"vmin": float(maps.min()), "vmax": float(maps.max())}
    masks = data.test_masks if data.test_masks is not None else [None] * len(maps)
    for image, heat, mask, defect, filename in zip(
        data.test_images,
        maps,
        masks,
        data.test_defect_types,
        data.test_filenames,
        strict=True,
    ):
        display = AnomalyMapDisplay.from_predictions(
            image[None], heat[None], threshold=threshold, masks=None if mask is None else mask[None], **scale
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
