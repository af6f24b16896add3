"""Fit PatchCore on generated textures, report image AUROC and draw anomaly maps.

Run from the repository root after installing (see README.md)::

    python examples/demo.py --output demo_heatmap.png
"""

import argparse
import time

import matplotlib

matplotlib.use("Agg")  # headless machines
import numpy as np

from skpatchcore import EfficientNetLite0Extractor, PatchCoreDetector
from skpatchcore.datasets import make_anomaly_images
from skpatchcore.display import AnomalyMapDisplay
from skpatchcore.metrics import image_auroc, pixel_auroc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo_heatmap.png", help="heatmap PNG to write")
    parser.add_argument("--n-train", type=int, default=40)
    parser.add_argument("--n-test", type=int, default=24)
    args = parser.parse_args()

    X_train, _, _ = make_anomaly_images(args.n_train, image_size=128, anomaly_ratio=0.0, random_state=0)
    X_test, y_test, masks = make_anomaly_images(args.n_test, image_size=128, anomaly_ratio=0.5, random_state=1)

    detector = PatchCoreDetector(
        feature_extractor=EfficientNetLite0Extractor(), image_size=128, random_state=0
    )
    start = time.perf_counter()
    detector.fit(X_train)
    print(f"fit on {len(X_train)} normal images in {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    maps, normality = detector.anomaly_maps(X_test, return_score_samples=True)
    print(f"scored {len(X_test)} images in {time.perf_counter() - start:.1f} s")
    print(f"image AUROC: {image_auroc(y_test, -normality):.3f}")
    print(f"pixel AUROC: {pixel_auroc(masks, maps):.3f}")
    predicted = detector.predict(X_test)
    print(f"flagged {np.sum(predicted == -1)} of {len(X_test)} images ({int(y_test.sum())} defective)")

    shown = np.flatnonzero(y_test == 1)[:4]
    display = AnomalyMapDisplay.from_estimator(detector, X_test[shown], masks=masks[shown])
    display.figure_.savefig(args.output, dpi=80)
    print(f"heatmap written to {args.output}")


if __name__ == "__main__":
    main()
