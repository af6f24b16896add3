"""Grid search with and without cached patch features (``PatchCoreDetector(memory=...)``).

    python benchmarks/search.py [--n-train 12] [--n-good 20] [--n-defective 15] [--image-size 128]
                                [--batch-size 4] [--repeats 3]

A ``GridSearchCV`` of 6 candidates (``coreset_ratio`` x ``sigma``, parameters
that do not touch the network) x 3 folds, scored by image AUROC, on a subset
of MVTec AD bottle read from ../shared/data (never copied here): the first
``--n-train`` training images plus ``--n-good`` good and ``--n-defective``
defective test images (spread over the defect types), loaded at
``--image-size``. EfficientNet-Lite0 (ImageNet weights), exact neighbours,
seed 0, ``--batch-size`` images per forward pass (default: the detector's).
The same search runs ``--repeats`` times each way in this process,
alternated so that drift of a shared machine cancels: without a cache (the
baseline), then with an empty ``joblib.Memory`` in a temporary folder and no
network kept from before (each cached search builds its network once). Both
include the final refit. A warm-up fit before them keeps one-off costs
(loading torch kernels) out of both.

The cache removes network passes only: each candidate still selects its
coreset and scores its leave-one-out thresholds, so the speed-up is below
the reduction in network work and grows with the share of the network in a
fit (more validation images, a heavier backbone).

Printed: both wall times of each repeat and their ratio, the median ratio,
the network's forward passes (batches) and images seen in each search, and
whether both searches give identical scores.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.model_selection import GridSearchCV, StratifiedKFold

from skpatchcore import EfficientNetLite0Extractor, PatchCoreDetector, feature_cache
from skpatchcore.datasets import load_mvtec
from skpatchcore.metrics import image_auroc_scorer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec"
GRID = {"coreset_ratio": [0.01, 0.02, 0.05], "sigma": [2.0, 4.0]}
PASSES: list[int] = []  # images per forward pass of the network


def _count(_module, inputs) -> None:
    PASSES.append(len(inputs[0]))


class CountingLite0(EfficientNetLite0Extractor):
    """EfficientNet-Lite0 whose loaded network records each forward pass."""

    def load(self):
        net = super().load()
        net.register_forward_pre_hook(_count)
        return net


def load_subset(n_train: int, n_good: int, n_defective: int, image_size: int):
    data = load_mvtec(DATA, "bottle", image_size=image_size)
    test = np.flatnonzero(data.test_defect_types == "good")[:n_good]
    types = sorted(set(data.test_defect_types) - {"good"})
    per_type = [np.flatnonzero(data.test_defect_types == t) for t in types]
    defective = np.concatenate([rows[: -(-n_defective // len(types))] for rows in per_type])
    rows = np.concatenate([test, defective[:n_defective]])
    X = np.concatenate([data.train_images[:n_train], data.test_images[rows]])
    y = np.concatenate([np.zeros(n_train, dtype=int), data.test_labels[rows]])
    return X, y


def search(X, y, image_size: int, batch_size: int, memory) -> tuple[GridSearchCV, float, list[int]]:
    detector = PatchCoreDetector(
        feature_extractor=CountingLite0(), image_size=image_size, algorithm="exact",
        batch_size=batch_size, random_state=0, memory=memory,
    )
    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    gs = GridSearchCV(detector, GRID, scoring=image_auroc_scorer, cv=cv)
    PASSES.clear()
    start = time.perf_counter()
    gs.fit(X, y)
    return gs, time.perf_counter() - start, list(PASSES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=12)
    parser.add_argument("--n-good", type=int, default=20)
    parser.add_argument("--n-defective", type=int, default=15)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=PatchCoreDetector().batch_size)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"MVTec AD bottle not found at {DATA}")

    X, y = load_subset(args.n_train, args.n_good, args.n_defective, args.image_size)
    n_candidates = int(np.prod([len(v) for v in GRID.values()]))
    print(f"bottle subset: {len(X)} images ({int(y.sum())} defective) at {args.image_size}px; "
          f"{n_candidates} candidates x 3 folds + refit, batches of {args.batch_size}")
    PatchCoreDetector(  # warm-up, untimed
        feature_extractor=CountingLite0(), image_size=args.image_size, algorithm="exact",
        random_state=0,
    ).fit(X[:4])

    ratios = []
    for repeat in range(args.repeats):
        plain, plain_time, plain_passes = search(X, y, args.image_size, args.batch_size, None)
        feature_cache._LAST_NETWORK.clear()  # the cached search builds its own network
        with tempfile.TemporaryDirectory() as cache:
            cached, cached_time, cached_passes = search(X, y, args.image_size, args.batch_size, cache)
        ratios.append(plain_time / cached_time)
        print(f"repeat {repeat + 1}: uncached {plain_time:5.1f} s, cached {cached_time:5.1f} s, "
              f"speed-up {ratios[-1]:.1f}x")
    for name, passes in (("uncached", plain_passes), ("cached", cached_passes)):
        print(f"{name:>9}: {len(passes):4d} forward passes, {sum(passes):5d} images through the network")
    print(f"speed-up: median {np.median(ratios):.1f}x over {args.repeats} repeats "
          f"(network images {sum(plain_passes) / sum(cached_passes):.1f}x fewer)")
    same = np.array_equal(plain.cv_results_["mean_test_score"], cached.cv_results_["mean_test_score"])
    print(f"identical cv scores: {same}; best {cached.best_params_} "
          f"AUROC {cached.best_score_:.3f}")


if __name__ == "__main__":
    main()
