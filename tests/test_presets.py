"""Named configurations: fresh estimators with the documented settings."""

import pytest

from skpatchcore import (
    EfficientNetLiteExtractor,
    ModuleExtractor,
    PatchCoreDetector,
    PatchCoreEnsemble,
)
from skpatchcore.presets import PRESETS, make_detector

from .conftest import tiny_cnn


def test_fast_is_the_papers_recipe_on_lite0():
    det = make_detector("fast")
    assert isinstance(det, PatchCoreDetector)
    assert (det.image_size, det.coreset_ratio) == (256, 0.1)
    assert det.feature_extractor.variant == "lite0"


def test_accurate_doubles_the_resolution_with_the_same_bank_size():
    det = make_detector("accurate")
    assert (det.image_size, det.coreset_ratio) == (512, 0.025)
    # 512^2 pixels per image whatever its aspect ratio: long parts cost what square ones do.
    assert det.image_size_rule == "area"
    assert isinstance(det.feature_extractor, EfficientNetLiteExtractor)
    # A coarser stage than the fast preset's, for context at the higher resolution.
    assert det.feature_extractor.layers == ("blocks.2", "blocks.4", "blocks.5")
    # 4x the patches at a quarter of the ratio: the fast preset's bank size.
    assert 4 * det.coreset_ratio == pytest.approx(make_detector("fast").coreset_ratio)
    # The stride-32 stage at 3/4 scale, and sigma 4 of a 256-px image at 512 px.
    assert det.feature_extractor.layer_weights == (1.0, 1.0, 0.75)
    assert det.sigma == 2 * make_detector("fast").sigma
    # One image per forward pass (cache-friendly on a CPU), exact search (no graph build).
    assert (det.batch_size, det.algorithm) == (1, "exact")


def test_parameters_are_set_on_top_of_the_preset():
    det = make_detector("fast", random_state=3, algorithm="exact")
    assert (det.random_state, det.algorithm, det.image_size) == (3, "exact", 256)


def test_each_call_builds_a_new_estimator():
    first, second = make_detector("fast"), make_detector("fast")
    assert first is not second and first.feature_extractor is not second.feature_extractor


def test_parameters_reach_every_member_of_an_ensemble_preset(monkeypatch):
    def pair():
        return PatchCoreEnsemble([
            ("a", PatchCoreDetector(feature_extractor=ModuleExtractor(tiny_cnn(), ["layer1"]))),
            PatchCoreDetector(feature_extractor=ModuleExtractor(tiny_cnn(), ["layer2"])),
        ])

    monkeypatch.setitem(PRESETS, "pair", pair)
    ensemble = make_detector("pair", random_state=5)
    assert ensemble.get_params()["a__random_state"] == 5
    assert ensemble.get_params()["d1__random_state"] == 5


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match=r"\['accurate', 'fast'\]"):
        make_detector("slow")
