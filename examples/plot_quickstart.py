"""
Quickstart: fit, score, predict
===============================

Fit :class:`~skpatchcore.PatchCoreDetector` on images of good parts only, then
score new images. The sign conventions are scikit-learn's: ``score_samples``
is higher for normal images, ``predict`` returns +1 (normal) or -1
(anomalous), and ``anomaly_maps`` is higher where a pixel looks anomalous.
"""

# %%
# Generated data: a woven texture, some images with scratches, spots or stains.
from skpatchcore import PatchCoreDetector, TorchvisionExtractor
from skpatchcore.datasets import make_anomaly_images
from skpatchcore.metrics import image_auroc, pixel_auroc

X_train, _, _ = make_anomaly_images(20, image_size=64, anomaly_ratio=0.0, random_state=0)
X_test, y_test, masks = make_anomaly_images(12, image_size=64, anomaly_ratio=0.5, random_state=1)

# %%
# Random weights keep this example offline and fast; use an ImageNet backbone
# (the default ``"wide_resnet50_2"``, or ``EfficientNetLite0Extractor()``) in practice.
detector = PatchCoreDetector(
    feature_extractor=TorchvisionExtractor("resnet18", weights=None),
    image_size=64,
    random_state=0,
).fit(X_train)

normality = detector.score_samples(X_test)
maps = detector.anomaly_maps(X_test)
print(f"image AUROC {image_auroc(y_test, -normality):.3f}")
print(f"pixel AUROC {pixel_auroc(masks, maps):.3f}")
print("predictions:", detector.predict(X_test))
print("truth:      ", 1 - 2 * y_test)
