"""
Thresholds from labelled images
===============================

By default the detector's thresholds come from its normal training images
alone (each scored against the others). When a few labelled images exist,
:class:`~skpatchcore.TunedThresholdDetectorCV` sets the image threshold
(``offset_``) and, given defect masks, the pixel threshold of
``predict_masks`` from them: at the best F1, or at a target false-alarm rate
on the normal images. Like scikit-learn's ``TunedThresholdClassifierCV``, it
scores every image out of fold, then refits on all of them.
"""

# %%
from sklearn.metrics import f1_score

from skpatchcore import PatchCoreDetector, TorchvisionExtractor, TunedThresholdDetectorCV
from skpatchcore.datasets import make_anomaly_images

X, y, masks = make_anomaly_images(24, image_size=64, anomaly_ratio=0.3, random_state=0)
X_test, y_test, _ = make_anomaly_images(12, image_size=64, anomaly_ratio=0.5, random_state=1)
detector = PatchCoreDetector(
    feature_extractor=TorchvisionExtractor("resnet18", weights=None), image_size=64, random_state=0
)

default = detector.fit(X[y == 0])
f1_tuned = TunedThresholdDetectorCV(detector, cv=2).fit(X, masks)
low_alarm = TunedThresholdDetectorCV(
    detector, objective="false_alarm_rate", max_false_alarm_rate=0.05, cv=2
).fit(X, y)

for name, model in (("normal images only", default), ("best F1", f1_tuned),
                    ("<= 5% false alarms", low_alarm)):
    flagged = model.predict(X_test) == -1
    print(f"{name:>20}: offset {model.offset_:8.3f}, test F1 {f1_score(y_test, flagged):.2f}, "
          f"false alarms {flagged[y_test == 0].mean():.0%}")
