"""Loading a pynndescent-backed detector: stored graph arrays vs a deterministic rebuild.

Each way runs in a fresh interpreter, as on an inspection PC that loads a model
file: (a) ``skpatchcore.load`` restores the pynndescent index from its arrays;
(b) the same file's bank is re-indexed with the saved seed
(``NearestNeighborIndex.fit``), which includes pynndescent's graph construction
and its numba compilation (not cached on disk). Both then answer one query
batch; the script checks that both give the saved detector's neighbours and
prints the time of each and their ratio.

    PYTHONPATH=. python benchmarks/persistence.py [--bank 5000] [--dim 152]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

LOAD = """
import time, json, numpy as np
start = time.perf_counter()
import skpatchcore
det = skpatchcore.load({path!r})
index = det.nn_index_
idx = index.kneighbors(np.load({queries!r}))[1]
print(json.dumps({{"seconds": time.perf_counter() - start, "same": bool((idx == np.load({expected!r})).all())}}))
"""

REBUILD = """
import time, json, numpy as np
start = time.perf_counter()
import skpatchcore
det = skpatchcore.load({path!r})
old = det.nn_index_
index = skpatchcore.NearestNeighborIndex(**old.get_params()).fit(old.bank_)
idx = index.kneighbors(np.load({queries!r}))[1]
print(json.dumps({{"seconds": time.perf_counter() - start, "same": bool((idx == np.load({expected!r})).all())}}))
"""


def fresh(code: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=152)
    args = parser.parse_args()

    import skpatchcore
    from skpatchcore import NearestNeighborIndex, PatchCoreDetector, TorchvisionExtractor

    rng = np.random.RandomState(0)
    bank = rng.rand(args.bank, args.dim).astype(np.float32)
    queries = bank[:1024] + rng.normal(0, 0.01, (1024, args.dim)).astype(np.float32)
    # A real fitted detector whose index is swapped for one over the synthetic bank:
    # the file then holds exactly what a large fit would store.
    images = rng.randint(0, 256, (2, 64, 64, 3)).astype(np.uint8)
    det = PatchCoreDetector(
        feature_extractor=TorchvisionExtractor("resnet18", weights=None), image_size=64,
        algorithm="exact", n_neighbors=1, random_state=0,
    ).fit(images)
    det.nn_index_ = NearestNeighborIndex("pynndescent", random_state=0).fit(bank)
    expected = det.nn_index_.kneighbors(queries)[1]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "det.safetensors")
        skpatchcore.save(det, path)
        np.save(os.path.join(tmp, "q.npy"), queries)
        np.save(os.path.join(tmp, "e.npy"), expected)
        names = dict(path=path, queries=os.path.join(tmp, "q.npy"), expected=os.path.join(tmp, "e.npy"))
        stored = fresh(LOAD.format(**names))
        rebuilt = fresh(REBUILD.format(**names))
        size = os.path.getsize(path) / 2**20
    print(f"bank {args.bank} x {args.dim}, file {size:.1f} MiB; fresh process, import + load + 1024 queries")
    print(f"  stored graph arrays: {stored['seconds']:7.2f} s  same neighbours: {stored['same']}")
    print(f"  rebuilt from bank:   {rebuilt['seconds']:7.2f} s  same neighbours: {rebuilt['same']}")
    print(f"  rebuild / stored:    {rebuilt['seconds'] / stored['seconds']:7.1f}x")


if __name__ == "__main__":
    main()
