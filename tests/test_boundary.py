"""The public boundary: whatever a caller passes either works or raises a clear error.

Property-based (hypothesis) over the inputs of a tiny fitted detector, plus
interrupted fits, concurrent scoring and cross-process reproducibility.
"""

import json
import os
import subprocess
import sys
import threading
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted
from torch import nn

import skpatchcore.detector
from skpatchcore import ModuleExtractor, PatchCoreDetector

from .conftest import tiny_cnn

PACKAGE = Path(skpatchcore.detector.__file__).parent
ROOT = PACKAGE.parent
BOUNDARY = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

DTYPES = st.sampled_from(
    ["uint8", "uint16", "int8", "int16", "int32", "int64", "float16", "float32", "float64",
     "bool", "complex64", "U2"]
)


@pytest.fixture(scope="module")
def fitted(textures):
    return PatchCoreDetector(
        feature_extractor=ModuleExtractor(tiny_cnn(), ["layer1", "layer2"]), image_size=32,
        algorithm="exact", random_state=0,
    ).fit(textures[0][6:])


def assert_clear_error(exc: BaseException) -> None:
    """A ValueError/TypeError raised by skpatchcore's own checks, not deep in torch or numpy."""
    assert isinstance(exc, (ValueError, TypeError)), repr(exc)
    origin = traceback.extract_tb(exc.__traceback__)[-1].filename
    assert Path(origin).resolve().is_relative_to(PACKAGE), f"{exc!r} raised in {origin}"


def works_or_explains(method, X):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no leaked torch/numpy warnings either
        try:
            return method(X)
        except Exception as exc:  # noqa: BLE001 - the property is about which ones
            assert_clear_error(exc)
            return None


def image_arrays(max_side=12):
    shapes = hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=max_side)
    return DTYPES.flatmap(lambda dtype: hnp.arrays(dtype, shapes))


@BOUNDARY
@given(X=image_arrays())
def test_score_samples_works_or_explains_on_any_array(fitted, X):
    scores = works_or_explains(fitted.score_samples, X)
    if scores is not None:
        assert scores.shape == (len(X),) and np.isfinite(scores).all()


@BOUNDARY
@given(X=image_arrays(), data=st.data())
def test_every_scoring_method_works_or_explains(fitted, X, data):
    method = data.draw(st.sampled_from(["predict", "decision_function", "anomaly_maps", "predict_masks"]))
    out = works_or_explains(getattr(fitted, method), X)
    if out is not None:
        assert len(out) == len(X)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(X=image_arrays(max_side=10))
def test_fit_works_or_explains_on_any_array(tiny_params, X):
    detector = PatchCoreDetector(**tiny_params)
    if works_or_explains(detector.fit, X) is not None:
        assert np.isfinite(detector.offset_)


def one_image(channels):
    side = st.integers(1, 48)
    return st.tuples(side, side).flatmap(
        lambda hw: hnp.arrays(
            np.uint8, hw if channels is None else (*hw, channels), elements=st.integers(0, 255)
        )
    )


@pytest.fixture(scope="module")
def fitted_gray(textures):
    return PatchCoreDetector(
        feature_extractor=ModuleExtractor(tiny_cnn(), ["layer1", "layer2"]), image_size=32,
        algorithm="exact", random_state=0,
    ).fit(textures[0][6:, :, :, 0])


@BOUNDARY
@given(images=st.lists(one_image(3), min_size=1, max_size=4))
def test_lists_of_mixed_sizes_give_a_map_per_image_at_its_size(fitted, images):
    # The fixture is fitted on RGB images; grayscale lists are covered by the gray fit below.
    maps, scores = fitted.anomaly_maps(images, return_score_samples=True)
    assert [m.shape for m in maps] == [image.shape[:2] for image in images]
    assert scores.shape == (len(images),) and np.isfinite(scores).all()


@BOUNDARY
@given(images=st.lists(st.sampled_from([None, 1]).flatmap(one_image), min_size=1, max_size=4))
def test_grayscale_lists_of_mixed_sizes_and_layouts(fitted_gray, images):
    maps = fitted_gray.anomaly_maps(images)
    assert [m.shape for m in maps] == [image.shape[:2] for image in images]


@BOUNDARY
@given(
    X=hnp.arrays(np.uint8, (2, 40, 40, 3), elements=st.integers(0, 255)),
    pattern=st.sampled_from(["random", "zeros", "full", "checker"]),
    view=st.sampled_from(["contiguous", "strided", "transposed", "fortran", "reversed"]),
    read_only=st.booleans(),
)
def test_any_memory_layout_scores_like_a_contiguous_copy(fitted, X, pattern, view, read_only):
    if pattern == "zeros":
        X[:] = 0
    elif pattern == "full":
        X[:] = 255
    elif pattern == "checker":
        X[:] = (np.indices((40, 40)).sum(axis=0) % 2 * 255)[None, :, :, None]
    X = {
        "contiguous": X,
        "strided": X[:, ::2, ::2],
        "transposed": X.transpose(0, 2, 1, 3),
        "fortran": np.asfortranarray(X),
        "reversed": X[:, ::-1, ::-1],
    }[view]
    X.flags.writeable = not read_only
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = fitted.score_samples(X)
    np.testing.assert_array_equal(scores, fitted.score_samples(np.array(X, order="C")))


# --------------------------------------------------------------- interrupted fit
# Extraction, coreset selection, index build: the name in skpatchcore.detector and
# the method interrupted (None: the function itself).
STAGES = {"cached_patch_embeddings": None, "ProjectedRows": "select", "NearestNeighborIndex": "fit"}


@pytest.mark.parametrize("stage", STAGES)
def test_interrupted_fit_leaves_a_fitted_detector_as_it_was(monkeypatch, fitted, stage, textures):
    before = {key: value for key, value in vars(fitted).items() if key.endswith("_")}
    scores = fitted.score_samples(textures[1])
    monkeypatch.setattr(skpatchcore.detector, stage, _interrupting(stage))
    with pytest.raises(KeyboardInterrupt):
        fitted.fit(textures[0][:8])
    monkeypatch.undo()
    after = {key: value for key, value in vars(fitted).items() if key.endswith("_")}
    assert after.keys() == before.keys()
    assert all(after[key] is before[key] for key in before)
    np.testing.assert_array_equal(fitted.score_samples(textures[1]), scores)


@pytest.mark.parametrize("stage", STAGES)
def test_interrupted_fit_leaves_an_unfitted_detector_unfitted(monkeypatch, tiny_params, stage, textures):
    detector = PatchCoreDetector(**tiny_params)
    monkeypatch.setattr(skpatchcore.detector, stage, _interrupting(stage))
    with pytest.raises(KeyboardInterrupt):
        detector.fit(textures[0][6:])
    with pytest.raises(NotFittedError):
        check_is_fitted(detector)


def _interrupting(stage):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if STAGES[stage] is None:
        return interrupt
    original = getattr(skpatchcore.detector, stage)
    return type(f"Interrupting{stage}", (original,), {STAGES[stage]: interrupt})


# ------------------------------------------------------------------------ threads
def concurrent(method, inputs):
    results = [None] * len(inputs)
    barrier = threading.Barrier(len(inputs))

    def run(i):
        barrier.wait()
        results[i] = method(inputs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def four_batches(textures):
    normal, defective, _ = textures
    return [defective, normal[:6], defective[::-1], normal[3:9]]


def test_four_threads_score_as_serial(fitted, textures):
    inputs = four_batches(textures) * 2
    serial = [fitted.anomaly_maps(X, return_score_samples=True) for X in inputs]
    threaded = concurrent(lambda X: fitted.anomaly_maps(X, return_score_samples=True), inputs)
    for (maps, scores), (t_maps, t_scores) in zip(serial, threaded):
        np.testing.assert_array_equal(t_scores, scores)
        np.testing.assert_array_equal(t_maps, maps)


class _Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so features come from hooks."""

    def __init__(self):
        super().__init__()
        self.body = tiny_cnn()

    def forward(self, x):
        if x.sum() > 0:
            x = x * 1.0
        return self.body(x)


def test_four_threads_score_as_serial_with_a_hooked_network(textures):
    torch.manual_seed(0)
    detector = PatchCoreDetector(
        feature_extractor=ModuleExtractor(_Untraceable(), ["body.layer1", "body.layer2"]),
        image_size=32, algorithm="exact", random_state=0,
    ).fit(textures[0][6:])
    assert type(detector.feature_extractor_.body).__name__ == "_HookedBody"
    inputs = four_batches(textures)
    serial = [detector.score_samples(X) for X in inputs]
    for threaded, expected in zip(concurrent(detector.score_samples, inputs), serial):
        np.testing.assert_array_equal(threaded, expected)


def test_four_threads_score_as_serial_with_pynndescent(tiny_params, textures):
    pytest.importorskip("pynndescent")
    detector = PatchCoreDetector(**dict(tiny_params, algorithm="pynndescent")).fit(textures[0][6:])
    inputs = four_batches(textures) * 2
    serial = [detector.anomaly_maps(X) for X in inputs]
    for threaded, expected in zip(concurrent(detector.anomaly_maps, inputs), serial):
        np.testing.assert_array_equal(threaded, expected)


# ----------------------------------------------------------- cross-process seeds
FIT_AND_REPORT = """
import json, numpy as np
from skpatchcore import ModuleExtractor, PatchCoreDetector
from skpatchcore.datasets import make_anomaly_images
from tests.conftest import tiny_cnn
X, y, _ = make_anomaly_images(16, image_size=32, random_state=0)
det = PatchCoreDetector(
    feature_extractor=ModuleExtractor(tiny_cnn(), ["layer1", "layer2"]), image_size=32,
    random_state=0,
).fit(X[y == 0])
print(json.dumps({
    "coreset": det.coreset_indices_.tolist(),
    "offset": det.offset_.hex(),
    "pixel": det.pixel_threshold_.hex(),
    "scores": det.score_samples(X).tobytes().hex(),
}))
"""


def test_same_random_state_fits_identically_in_two_processes():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", FIT_AND_REPORT], check=True, capture_output=True,
                text=True, cwd=ROOT, env=env,
            ).stdout.splitlines()[-1]
        )
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    assert len(runs[0]["coreset"]) > 0
