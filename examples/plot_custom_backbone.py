"""
A custom ``torch.nn.Module`` backbone
=====================================

Any network works: wrap it in :class:`~skpatchcore.ModuleExtractor` with the
names of the layers to read, shallow to deep (``torch.fx`` graph nodes, or
submodule names for networks that cannot be traced). The detector pools the
layers into patch features as it does for torchvision backbones.
"""

# %%
from collections import OrderedDict

import torch
from torch import nn

from skpatchcore import ModuleExtractor, PatchCoreDetector
from skpatchcore.datasets import make_anomaly_images
from skpatchcore.metrics import image_auroc

torch.manual_seed(0)
net = nn.Sequential(
    OrderedDict(
        stem=nn.Conv2d(3, 16, 3, stride=2, padding=1),
        act0=nn.ReLU(),
        block1=nn.Conv2d(16, 32, 3, stride=2, padding=1),
        act1=nn.ReLU(),
        block2=nn.Conv2d(32, 64, 3, stride=2, padding=1),
    )
)
# For a network with trained weights: net.load_state_dict(torch.load("weights.pth"))

X_train, _, _ = make_anomaly_images(20, image_size=64, anomaly_ratio=0.0, random_state=0)
X_test, y_test, _ = make_anomaly_images(12, image_size=64, anomaly_ratio=0.5, random_state=1)
detector = PatchCoreDetector(
    feature_extractor=ModuleExtractor(net, ["block1", "block2"]), image_size=64, random_state=0
).fit(X_train)
print("patch grid and dimension:", detector.feature_shape_)
print(f"image AUROC {image_auroc(y_test, -detector.score_samples(X_test)):.3f}")
