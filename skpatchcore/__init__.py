"""PatchCore industrial anomaly detection as a scikit-learn estimator."""

from .coreset import GreedyCoresetSampler
from .detector import PatchCoreDetector
from .ensemble import PatchCoreEnsemble
from .export import export_onnx
from .features import (
    EfficientNetLite0Extractor,
    EfficientNetLiteExtractor,
    FeatureExtractor,
    ModuleExtractor,
    TorchvisionExtractor,
)
from .neighbors import NearestNeighborIndex
from .persistence import load, save
from .reader import ImageReader
from .thresholds import TunedThresholdDetectorCV

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
    "ImageReader",
    "TunedThresholdDetectorCV",
    "save",
    "load",
    "export_onnx",
]
