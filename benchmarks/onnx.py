"""onnxruntime on the exported graph against ``PatchCoreDetector.score_samples``, per image.

    PYTHONPATH=. python benchmarks/onnx.py [--backbone lite0|resnet18] [--size 128] [--train 20]

Data: MVTec AD bottle from ../shared/data (never copied here), resized to
``--size`` when present (the training images fit the detector, the 83 test
images are scored); synthetic images otherwise. ResNet-18 has random weights
(no download here), Lite0 its packaged ImageNet weights. Both sides run on the
CPU in this process, with torch's and onnxruntime's default threads; each time
is the best of 3 rounds of: every test image alone (batch 1), and all test
images in batches of 16 (the detector's default ``batch_size``). The script
also prints the largest differences of scores and maps, the export's accuracy
on real images.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and this file
# would shadow the onnx package that torch's exporter imports.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import numpy as np  # noqa: E402

from skpatchcore import (  # noqa: E402
    EfficientNetLite0Extractor,
    PatchCoreDetector,
    TorchvisionExtractor,
    export_onnx,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec"


def images(size: int, n_train: int):
    if (DATA / "bottle").is_dir():
        from skpatchcore.datasets import load_mvtec

        data = load_mvtec(DATA, "bottle", image_size=size)
        return data.train_images[:n_train], data.test_images, "MVTec bottle"
    from skpatchcore.datasets import make_anomaly_images

    X, y, _ = make_anomaly_images(n_train + 40, image_size=size, random_state=0)
    train = np.flatnonzero(y == 0)[:n_train]
    return X[train], np.delete(X, train, axis=0), "synthetic (no ../shared/data)"


def best_of(rounds: int, run) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", choices=["lite0", "resnet18"], default="lite0")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--train", type=int, default=20)
    args = parser.parse_args()
    import onnxruntime as ort

    train, test, source = images(args.size, args.train)
    extractor = (
        EfficientNetLite0Extractor() if args.backbone == "lite0"
        else TorchvisionExtractor("resnet18", weights=None)
    )
    detector = PatchCoreDetector(
        feature_extractor=extractor, image_size=args.size, algorithm="exact", random_state=0,
    ).fit(train)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "detector.onnx")
        export_onnx(detector, path)
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    floats = test.astype(np.float32) / 255.0

    def onnx_scores(X):
        return session.run(["score_samples"], {"images": X})[0]

    batches = [slice(i, i + 16) for i in range(0, len(test), 16)]
    timings = {
        "batch 1": (
            best_of(3, lambda: [detector.score_samples(test[i : i + 1]) for i in range(len(test))]),
            best_of(3, lambda: [onnx_scores(floats[i : i + 1]) for i in range(len(test))]),
        ),
        "batch 16": (
            best_of(3, lambda: [detector.score_samples(test[b]) for b in batches]),
            best_of(3, lambda: [onnx_scores(floats[b]) for b in batches]),
        ),
    }
    maps, scores = detector.anomaly_maps(test, return_score_samples=True)
    onnx_s, onnx_m = session.run(None, {"images": floats})
    print(f"{source}: {len(train)} training, {len(test)} test images at {args.size} px, "
          f"{args.backbone}, bank {detector.memory_bank_.shape}")
    print(f"  score rel. diff max {np.max(np.abs(onnx_s - scores) / np.abs(scores)):.2e}; "
          f"map diff / map max {np.max(np.abs(onnx_m - maps).max(axis=(1, 2)) / maps.max(axis=(1, 2))):.2e}")
    for name, (ours, onnx) in timings.items():
        print(f"  {name:9s} score_samples {1e3 * ours / len(test):7.1f} ms/image   "
              f"onnxruntime {1e3 * onnx / len(test):7.1f} ms/image   ratio {ours / onnx:5.2f}x")


if __name__ == "__main__":
    main()
