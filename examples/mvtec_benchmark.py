"""
The MVTec AD benchmark
======================

Not executed by the gallery: it needs the MVTec AD images (licensed
CC BY-NC-SA 4.0, never shipped with skpatchcore). Point ``ROOT`` at a folder
holding the official category folders. The command line does the same::

    skpatchcore benchmark --root mvtec --category bottle --backbone efficientnet_lite0 \\
        --output results --heatmaps
"""

# %%
from skpatchcore import EfficientNetLite0Extractor, PatchCoreDetector
from skpatchcore.datasets import load_mvtec
from skpatchcore.metrics import aupro, image_auroc, pixel_auroc

ROOT = "../shared/data/mvtec"
data = load_mvtec(ROOT, "bottle", image_size=256)
detector = PatchCoreDetector(feature_extractor=EfficientNetLite0Extractor(), random_state=0)
detector.fit(data.train_images)
maps, normality = detector.anomaly_maps(data.test_images, return_score_samples=True)
print(f"image AUROC {image_auroc(data.test_labels, -normality):.3f}")
print(f"pixel AUROC {pixel_auroc(data.test_masks, maps):.3f}")
print(f"AUPRO       {aupro(data.test_masks, maps):.3f}")
