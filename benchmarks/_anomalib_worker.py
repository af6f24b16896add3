"""anomalib's PatchCore, fitted and timed in its own virtual environment.

Run by ``compare_anomalib.py`` with the peer environment's Python (never
imported by skpatchcore): ``python _anomalib_worker.py JOB.json``. It reads
the images and the backbone weights that the harness prepared, builds
anomalib's unmodified ``PatchcoreModel`` with them, and runs what anomalib's
``Patchcore`` lightning module runs (the training forward passes collecting
embeddings, ``subsample_embedding``, then the inference forward), without the
Lightning trainer around it. The pre-processing is anomalib's default for
PatchCore, ``Resize((256, 256))`` then ImageNet normalisation, applied to
images that the harness already gives at that size. It writes timings, peak
RSS, image scores, maps and the backbone's feature maps of a probe batch.
"""

import json
import sys
import time

import numpy as np
import torch
from _rss import peak_rss_mib

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def to_input(images: np.ndarray) -> torch.Tensor:
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    if batch.shape[1] == 1:
        batch = batch.expand(-1, 3, -1, -1)
    return (batch - IMAGENET_MEAN) / IMAGENET_STD


def main(job_path: str) -> None:
    job = json.load(open(job_path))
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    data = np.load(job["data"])
    train, test = data["train"], data["test"]
    model = PatchcoreModel(
        layers=job["layers"], backbone=job["timm_name"], pre_trained=False,
        num_neighbors=job["n_neighbors"],
    )
    body = model.feature_extractor.feature_extractor
    state = torch.load(job["weights"], map_location="cpu", weights_only=True)
    missing, _ = body.load_state_dict(state, strict=False)
    if missing:
        raise SystemExit(f"anomalib backbone: weights missing for {missing}")
    model.eval()
    loaded_mib = peak_rss_mib()
    with torch.no_grad():
        probe = model.feature_extractor(to_input(data["probe"]))
    np.savez(job["probe_out"], *[probe[name].numpy() for name in job["layers"]])

    batch_size = job["batch_size"]
    # The coreset's random projection (torch and NumPy's global generators) and start.
    torch.manual_seed(job["seed"])
    np.random.seed(job["seed"])
    times = {"loaded_rss_mib": loaded_mib}
    start = time.perf_counter()
    model.train()
    with torch.no_grad():
        for i in range(0, len(train), batch_size):
            model(to_input(train[i : i + batch_size]))
    times["fit_extraction_s"] = time.perf_counter() - start
    mid = time.perf_counter()
    model.subsample_embedding(job["coreset_ratio"])
    times["fit_coreset_s"] = time.perf_counter() - mid
    times["fit_s"] = time.perf_counter() - start
    model.eval()

    def predict(images):
        with torch.no_grad():
            out = model(to_input(images))
        return out.pred_score.numpy(), out.anomaly_map[:, 0].numpy()

    n_one = min(job["batch1_images"], len(test))
    predict(test[:1])  # first call's allocations, as ours gets
    start = time.perf_counter()
    for i in range(n_one):
        predict(test[i : i + 1])
    times["predict_batch1_ms"] = 1000 * (time.perf_counter() - start) / n_one
    scores, maps = [], []
    start = time.perf_counter()
    for i in range(0, len(test), batch_size):
        s, m = predict(test[i : i + batch_size])
        scores.append(s)
        maps.append(m)
    times["predict_batched_ms"] = 1000 * (time.perf_counter() - start) / len(test)
    times["predict_maps_batched_ms"] = times["predict_batched_ms"]  # its forward always makes maps
    times["peak_rss_mib"] = peak_rss_mib()
    times["bank_rows"] = int(model.memory_bank.shape[0])
    np.savez(job["scores_out"], scores=np.concatenate(scores), maps=np.concatenate(maps))
    json.dump(times, open(job["result_out"], "w"))


if __name__ == "__main__":
    main(sys.argv[1])
