"""
Saving and loading a fitted detector
====================================

A fitted detector pickles with its network and memory bank, so the factory
line loads one file and scores without rebuilding anything. A detector fitted
on a GPU is saved with its network on the CPU; after loading on a machine
without one, ``set_params(device="cpu")``.
"""

# %%
import tempfile
from pathlib import Path

import joblib
import numpy as np

from skpatchcore import PatchCoreDetector, TorchvisionExtractor
from skpatchcore.datasets import make_anomaly_images

X_train, _, _ = make_anomaly_images(24, image_size=64, anomaly_ratio=0.0, random_state=0)
X_test, _, _ = make_anomaly_images(6, image_size=64, anomaly_ratio=0.5, random_state=1)
detector = PatchCoreDetector(
    feature_extractor=TorchvisionExtractor("resnet18", weights=None), image_size=64, random_state=0
).fit(X_train)

path = Path(tempfile.mkdtemp()) / "patchcore.joblib"
joblib.dump(detector, path)
loaded = joblib.load(path)
print(f"{path.stat().st_size / 1e6:.1f} MB on disk")
print("same scores:", np.array_equal(loaded.score_samples(X_test), detector.score_samples(X_test)))
