"""
Plotting anomaly maps
=====================

:class:`~skpatchcore.display.AnomalyMapDisplay` follows scikit-learn's
``RocCurveDisplay``: ``from_estimator`` computes and draws, ``from_predictions``
draws maps you already have, ``plot(ax=...)`` draws into your own axes. Each
image gets its map in colour (one scale and one colour bar for all), the
outline of the predicted defect (white, pixels above the detector's
``pixel_threshold_``) and of the true defect (green) when masks are given.
"""

# %%
import matplotlib.pyplot as plt

from skpatchcore import PatchCoreDetector, TorchvisionExtractor
from skpatchcore.datasets import make_anomaly_images
from skpatchcore.display import AnomalyMapDisplay

X_train, _, _ = make_anomaly_images(20, image_size=64, anomaly_ratio=0.0, random_state=0)
X_test, y_test, masks = make_anomaly_images(4, image_size=64, anomaly_ratio=1.0, random_state=2)
detector = PatchCoreDetector(
    feature_extractor=TorchvisionExtractor("resnet18", weights=None), image_size=64, random_state=0
).fit(X_train)

# %%
# Several images in a grid, scores in the titles.
display = AnomalyMapDisplay.from_estimator(detector, X_test, masks=masks, n_cols=4)

# %%
# Maps computed once, drawn twice: at the default threshold and at a stricter one.
maps = detector.anomaly_maps(X_test[:2])
fig, axes = plt.subplots(2, 2, figsize=(7, 6), layout="constrained")
AnomalyMapDisplay.from_predictions(
    X_test[:2], maps, threshold=detector.pixel_threshold_, masks=masks[:2], ax=axes[0]
)
AnomalyMapDisplay.from_predictions(
    X_test[:2], maps, threshold=1.2 * detector.pixel_threshold_, masks=masks[:2], ax=axes[1],
    colorbar=False,
)
plt.show()
