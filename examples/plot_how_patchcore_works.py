"""
How PatchCore works, in three pictures
======================================

PatchCore describes every image as a grid of *patch features* taken from the
middle layers of a pretrained CNN, keeps a representative subset of the
training patches (the *coreset*) as its memory bank, and scores a new patch
by its distance to the nearest bank entry. This example draws each step on
generated images.
"""

# %%
import matplotlib.pyplot as plt
import numpy as np

from skpatchcore import PatchCoreDetector, TorchvisionExtractor
from skpatchcore.datasets import make_anomaly_images
from skpatchcore.features import extract_patch_features

extractor = TorchvisionExtractor("resnet18", weights=None)
X_train, _, _ = make_anomaly_images(12, image_size=64, anomaly_ratio=0.0, random_state=0)
X_test, y_test, masks = make_anomaly_images(4, image_size=64, anomaly_ratio=1.0, random_state=3)
detector = PatchCoreDetector(
    feature_extractor=extractor, image_size=64, coreset_ratio=0.05, random_state=0
).fit(X_train)

# %%
# 1. Each image becomes an ``h x w`` grid of patch features (here 8 x 8 for a
#    64-pixel input at stride 8). 2. All training patches, projected to two
#    dimensions for the picture, and the coreset that forms the memory bank:
#    it covers the cloud with a few percent of the points. 3. A test image's
#    patch distances to the bank, upsampled and smoothed, are its anomaly map.
patches = extract_patch_features(extractor, X_train, image_size=64)
flat = patches.reshape(-1, patches.shape[-1])
centred = flat - flat.mean(axis=0)
axes2d = np.linalg.svd(centred, full_matrices=False)[2][:2]
points = centred @ axes2d.T

fig, ax = plt.subplots(1, 3, figsize=(12, 4), layout="constrained")
ax[0].imshow(X_train[0])
h, w = patches.shape[1:3]
for k in range(1, h):
    ax[0].axhline(k * 64 / h - 0.5, color="white", linewidth=0.5)
for k in range(1, w):
    ax[0].axvline(k * 64 / w - 0.5, color="white", linewidth=0.5)
ax[0].set_title(f"1. a {h}x{w} grid of patch features")
ax[1].scatter(*points.T, s=2, color="0.7", label="training patches")
ax[1].scatter(*points[detector.coreset_indices_].T, s=8, color="C3", label="coreset (memory bank)")
ax[1].legend(loc="upper right", fontsize="small")
ax[1].set_title("2. coreset of the training patches")
ax[2].imshow(X_test[0])
ax[2].imshow(detector.anomaly_maps(X_test[:1])[0], cmap="jet", alpha=0.5)
ax[2].contour(masks[0], levels=[0.5], colors="lime")
ax[2].set_title("3. distance to the bank: the anomaly map")
for a in ax[[0, 2]]:
    a.set_axis_off()
plt.show()
