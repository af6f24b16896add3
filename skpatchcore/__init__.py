"""PatchCore industrial anomaly detection as a scikit-learn estimator."""

from .coreset import GreedyCoresetSampler
from .detector import PatchCoreDetector
from .ensemble import PatchCoreEnsemble
from .features import (
    EfficientNetLite0Extractor,
    EfficientNetLiteExtractor,
    FeatureExtractor,
    ModuleExtractor,
    TorchvisionExtractor,
)
from .neighbors import NearestNeighborIndex

__version__ = "0.1.0"

__all__ = [
    "PatchCoreDetector",
    "PatchCoreEnsemble",
    "GreedyCoresetSampler",
    "NearestNeighborIndex",
    "FeatureExtractor",
    "TorchvisionExtractor",
    "ModuleExtractor",
    "EfficientNetLite0Extractor",
    "EfficientNetLiteExtractor",
]
