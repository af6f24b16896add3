"""PatchCoreDetector on CUDA against the CPU: fit and scoring times, and whether the scores agree.

    python benchmarks/gpu.py [--device {both,cuda,cpu}] [--n-train 64] [--n-test 32]
                             [--cpu-n-train 16] [--cpu-n-test 8] [--image-size 256]
                             [--backbone wide_resnet50_2]

Meant for a machine with a GPU: one to two minutes estimated on an H100 with
16 CPU cores, CPU part included (not measured yet; the CPU part alone took
40 s on a busy 2-core machine). ``--device cpu`` runs the CPU part alone;
without CUDA the other choices stop with a message saying so.

Data: ``make_anomaly_images`` textures, training images all normal (seed 0),
test images half anomalous (seed 1), at ``--image-size`` pixels.

Detector: the default backbone (wide_resnet50_2, layer2 + layer3, 1024-dim
patch features, a 32x32 patch grid at 256 px) with *random* weights
(``TorchvisionExtractor(weights=None)``: the GPU machine cannot download the
pretrained ones, and neither timing nor agreement depends on the weights),
coreset_ratio 0.1, ``algorithm="exact"`` (pynndescent runs on the CPU whatever
the device, and its numba compilation would dominate a short run),
random_state 0, batch_size 16. Torch's default precision settings apply, so
cuDNN convolutions use TF32 on Ampere and later GPUs.

Timing: CUDA fits ``--n-train`` images and scores ``--n-test``; the CPU fits
only ``--cpu-n-train`` and scores ``--cpu-n-test`` images, to keep the run
short, so CUDA also fits those ``--cpu-n-train`` images for a like-for-like fit
ratio. Scoring is reported per image: the best of 3 runs of ``score_samples``
over all test images, divided by their number. Fits run once and include
building the network. A warm-up fit and score of 2 images precedes the timed
runs on each device (CUDA context, cuDNN and kernel loading are not counted).

Agreement, on the ``--cpu-n-test`` images:

* same memory bank (checked): the CUDA-fitted detector scores them on CUDA,
  then, after a pickle round trip and ``set_params(device="cpu")``, on the
  CPU. Only the devices' arithmetic differs, so the largest relative
  difference must stay within 1e-3 with TF32 off; it is also shown with
  TF32 as torch sets it. Exit status 1 if the check fails.
* fitted apart (reported): the CPU-fitted detector against the CUDA-fitted
  one on the same images: the share of coreset rows both select and the
  largest relative score difference. Rounding differences may change greedy
  picks at near-ties, so this need not be within 1e-3.
"""

from __future__ import annotations

import argparse
import os
import pickle
import time
from contextlib import contextmanager

import numpy as np
import torch

from skpatchcore import PatchCoreDetector, TorchvisionExtractor
from skpatchcore.datasets import make_anomaly_images

SEED, RTOL = 0, 1e-3


def make_detector(backbone: str, image_size: int, device: str) -> PatchCoreDetector:
    return PatchCoreDetector(
        feature_extractor=TorchvisionExtractor(backbone, weights=None),
        image_size=image_size,
        algorithm="exact",
        batch_size=16,
        device=device,
        random_state=SEED,
    )


def timed_fit_and_score(detector, train, test):
    """Fitted detector, fit seconds, scoring seconds per test image (best of 3) and the scores."""
    start = time.perf_counter()
    detector.fit(train)
    fit_s = time.perf_counter() - start
    score_s = np.inf
    for _ in range(3):
        start = time.perf_counter()
        scores = detector.score_samples(test)  # numpy: waits for the GPU
        score_s = min(score_s, time.perf_counter() - start)
    return detector, fit_s, score_s / len(test), scores


@contextmanager
def tf32_off():
    """Full float32 precision for cuDNN convolutions and matrix products."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def max_relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.abs(b)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("--device", choices=["both", "cuda", "cpu"], default="both")
    parser.add_argument("--n-train", type=int, default=64, help="training images on CUDA")
    parser.add_argument("--n-test", type=int, default=32, help="test images on CUDA")
    parser.add_argument("--cpu-n-train", type=int, default=16, help="training images on the CPU")
    parser.add_argument("--cpu-n-test", type=int, default=8, help="test images on the CPU")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--backbone", default="wide_resnet50_2", help="torchvision model name")
    args = parser.parse_args()
    devices = ["cuda", "cpu"] if args.device == "both" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        parser.exit(2, (
            f"CUDA is not available to this torch ({torch.__version__}: "
            f"torch.cuda.is_available() is False). Run with --device cpu for the CPU part alone.\n"
        ))

    cuda_sizes = [(args.n_train, args.n_test)] if "cuda" in devices else []
    cpu_size = (args.cpu_n_train, args.cpu_n_test)
    n_train, n_test = np.max([cpu_size, *cuda_sizes], axis=0)
    train, _, _ = make_anomaly_images(
        n_train, image_size=args.image_size, anomaly_ratio=0.0, random_state=0
    )
    test, _, _ = make_anomaly_images(n_test, image_size=args.image_size, random_state=1)

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads")
    if "cuda" in devices:
        print(
            f"GPU: {torch.cuda.get_device_name()}; TF32 as torch sets it: cuDNN "
            f"{torch.backends.cudnn.allow_tf32}, matmul {torch.backends.cuda.matmul.allow_tf32}"
        )
    print(f"{args.backbone} (random weights), {args.image_size} px, coreset 0.1, exact search\n")
    print(f"{'device':6} {'train':>5} {'fit s':>8} {'test':>5} {'score s/img':>12}")
    runs = {}
    for device in devices:
        make_detector(args.backbone, args.image_size, device).fit(train[:2]).score_samples(test[:2])
        for size in (cuda_sizes if device == "cuda" else []) + [cpu_size]:
            detector = make_detector(args.backbone, args.image_size, device)
            runs[device, size] = timed_fit_and_score(detector, train[: size[0]], test[: size[1]])
            _, fit_s, score_s, _ = runs[device, size]
            print(f"{device:6} {size[0]:5d} {fit_s:8.2f} {size[1]:5d} {score_s:12.4f}")
    if devices == ["cuda", "cpu"]:
        print(
            f"\nCPU / CUDA: fit of {cpu_size[0]} images "
            f"{runs['cpu', cpu_size][1] / runs['cuda', cpu_size][1]:.1f}x, score per image "
            f"{runs['cpu', cpu_size][2] / runs['cuda', cuda_sizes[0]][2]:.1f}x"
        )
        check_agreement(runs["cuda", cpu_size], runs["cpu", cpu_size], test[: cpu_size[1]])


def check_agreement(cuda_run, cpu_run, test) -> None:
    """Print how the devices' scores of ``test`` differ; exit with status 1 if one bank's do."""
    cuda, _, _, cuda_scores = cuda_run
    cpu, _, _, cpu_scores = cpu_run
    with tf32_off():
        cuda_scores_ieee = cuda.score_samples(test)
    on_cpu = pickle.loads(pickle.dumps(cuda)).set_params(device="cpu").score_samples(test)
    ieee, default = (max_relative_difference(s, on_cpu) for s in (cuda_scores_ieee, cuda_scores))
    print(
        f"\nSame bank (CUDA-fitted), scored on CUDA vs on the CPU after pickling: largest "
        f"relative difference {ieee:.1e} with TF32 off, {default:.1e} with torch's TF32 settings"
    )
    shared = len(np.intersect1d(cuda.coreset_indices_, cpu.coreset_indices_))
    print(
        f"Fitted apart on the same {len(cpu.train_score_samples_)} images: "
        f"{shared / len(cpu.coreset_indices_):.1%} of the coreset rows shared, largest relative "
        f"score difference {max_relative_difference(cuda_scores, cpu_scores):.1e}"
    )
    if not ieee <= RTOL:
        raise SystemExit(f"FAILED: CUDA and CPU scores of one bank differ by {ieee:.1e} > {RTOL:g}")
    print(f"OK: CUDA and CPU scores of one bank agree within rtol {RTOL:g} (TF32 off)")

if __name__ == "__main__":
    main()
