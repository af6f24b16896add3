"""Model files that hold no code: a fitted detector as safetensors plus JSON.

A pickle (``pickle``, ``joblib``) runs whatever code its file names when it is
loaded, so a detector file received from elsewhere is a program. :func:`save`
writes one `safetensors <https://huggingface.co/docs/safetensors>`_ file
instead: every array (memory bank, thresholds, the network's weights, the
pynndescent graph) is a named tensor, and everything else (parameters, fitted
scalars, the backbone's description, library versions) is a JSON document in
the file's header. :func:`load` reads them back with a fixed list of the
classes it will create, so a file can describe a detector but never run code.

The JSON document is a tree of typed nodes: plain JSON values stand for
themselves; ``{"array": name}`` is a stored tensor; ``{"estimator": class,
"params": ..., "attributes": ...}`` one of the trusted estimator classes;
``{"network": prefix}`` the fitted backbone, re-created from the recorded
extractor and filled with the stored weights. A value of any other type is
refused by :func:`save` rather than written in a form :func:`load` could not
check.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from importlib import metadata

import numpy as np
import scipy.sparse as sp
import torch
from safetensors import SafetensorError
from safetensors.numpy import load as _load_tensors
from safetensors.numpy import save as _save_tensors
from sklearn.base import clone

from .detector import PatchCoreDetector
from .features import (
    EfficientNetLite0Extractor,
    FeatureExtractor,
    ModuleExtractor,
    TorchvisionExtractor,
    _fold_batchnorm,
)
from .neighbors import NearestNeighborIndex

__all__ = ["save", "load", "FORMAT_VERSION"]

FORMAT = "skpatchcore"
#: Version of the file layout; :func:`load` refuses files of a newer one.
FORMAT_VERSION = 1

# The only classes a file may ask for.
_ESTIMATORS = {
    cls.__name__: cls
    for cls in (
        PatchCoreDetector,
        NearestNeighborIndex,
        TorchvisionExtractor,
        EfficientNetLite0Extractor,
        ModuleExtractor,
    )
}
_VERSIONED = ("skpatchcore", "torch", "torchvision", "pynndescent", "scikit-learn", "numpy")
# A mismatch of these can change scores, so loading warns about it.
_WARN_ON_MISMATCH = ("torch", "torchvision", "scikit-learn")


def _version(package: str) -> str | None:
    if package == "skpatchcore":
        from . import __version__

        return __version__
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def save(detector: PatchCoreDetector, path: str | os.PathLike) -> None:
    """Write a fitted detector to a file that holds no code.

    Parameters
    ----------
    detector : PatchCoreDetector
        A fitted detector.
    path : str or path-like
        File to write (conventionally ``*.safetensors``); replaced if present.

    Raises
    ------
    TypeError
        If the detector holds a value this format cannot represent (for
        instance a parameter set to an arbitrary Python object).

    See Also
    --------
    load : Read it back.

    Notes
    -----
    The network is stored as its weights plus the extractor that describes
    its architecture, so loading needs torchvision (or timm for
    :class:`EfficientNetLite0Extractor`) but no download. A
    :class:`ModuleExtractor`'s module is not stored: :func:`load` asks the
    caller for it. The file is written through a temporary file in the same
    folder, so an interrupted save leaves any previous file as it was.

    Examples
    --------
    >>> import skpatchcore
    >>> skpatchcore.save(detector, "bottle.safetensors")  # doctest: +SKIP
    >>> detector = skpatchcore.load("bottle.safetensors")  # doctest: +SKIP
    """
    if not isinstance(detector, PatchCoreDetector):
        raise TypeError(f"save expects a PatchCoreDetector; got {type(detector).__name__}.")
    if not hasattr(detector, "memory_bank_"):
        raise ValueError("This PatchCoreDetector is not fitted yet: call fit before save.")
    encoder = _Encoder()
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": {name: _version(name) for name in _VERSIONED},
        "detector": encoder.encode(detector, "detector"),
    }
    payload = _save_tensors(
        encoder.tensors,
        metadata={FORMAT: json.dumps(document), "sha256": _digest(encoder.tensors)},
    )
    tmp = f"{os.fspath(path)}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as file:
            file.write(payload)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path: str | os.PathLike, *, module: torch.nn.Module | None = None) -> PatchCoreDetector:
    """Read a detector written by :func:`save`, running no code from the file.

    Parameters
    ----------
    path : str or path-like
        A file written by :func:`save`.
    module : torch.nn.Module, default=None
        The network of a detector fitted with a :class:`ModuleExtractor`
        (any weights: the stored ones replace them); such a file is refused
        without it.

    Returns
    -------
    detector : PatchCoreDetector
        Fitted, on the CPU whatever ``device`` it was saved with (the
        ``device`` parameter is kept: ``set_params(device="cpu")`` on a
        machine without the saved one). It scores bit-identically to the
        saved detector with the same library versions.

    Raises
    ------
    ValueError
        If the file is truncated, corrupted, not a skpatchcore model file, or
        written by a newer format version; or if a :class:`ModuleExtractor`
        detector is loaded without ``module``.

    Warns
    -----
    UserWarning
        If the file was written with another version of torch, torchvision or
        scikit-learn (scores may differ slightly).
    """
    with open(path, "rb") as file:
        raw = file.read()
    document, tensors = _read(raw, os.fspath(path))
    versions = document.get("versions", {})
    for name in _WARN_ON_MISMATCH:
        saved, current = versions.get(name), _version(name)
        if saved != current:
            warnings.warn(
                f"{os.fspath(path)} was saved with {name} {saved}; this is {name} {current}. "
                "Scores may differ slightly from the saved detector's.",
                UserWarning,
                stacklevel=2,
            )
    try:
        detector = _Decoder(tensors, module).decode(document["detector"])
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ValueError(f"{os.fspath(path)} is a corrupted skpatchcore model file ({exc!r}).") from exc
    if not isinstance(detector, PatchCoreDetector):
        raise ValueError(f"{os.fspath(path)} does not hold a PatchCoreDetector.")
    return detector


def _read(raw: bytes, name: str) -> tuple[dict, dict]:
    """Header document and tensors of a model file, checked before anything is built."""
    if len(raw) < 8:
        raise ValueError(f"{name} is not a skpatchcore model file: only {len(raw)} bytes (truncated?).")
    header_len = int.from_bytes(raw[:8], "little")
    if 8 + header_len > len(raw):
        raise ValueError(
            f"{name} is not a skpatchcore model file, or is truncated: its header claims "
            f"{header_len} bytes but the file has {len(raw)}."
        )
    try:
        header = json.loads(raw[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{name} is not a skpatchcore model file (unreadable header: {exc}).") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or FORMAT not in meta:
        raise ValueError(
            f"{name} is a safetensors file but not a skpatchcore model file (no "
            f"{FORMAT!r} entry in its metadata)."
        )
    try:
        document = json.loads(meta[FORMAT])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} is a corrupted skpatchcore model file ({exc}).") from None
    version = document.get("format_version") if isinstance(document, dict) else None
    if not isinstance(version, int) or document.get("format") != FORMAT:
        raise ValueError(f"{name} is a corrupted skpatchcore model file (no format version).")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{name} uses skpatchcore model format {version}, newer than the {FORMAT_VERSION} "
            f"this skpatchcore ({_version('skpatchcore')}) reads; upgrade skpatchcore "
            f"(it was written by skpatchcore {document.get('versions', {}).get('skpatchcore')})."
        )
    try:
        tensors = _load_tensors(raw)
    except SafetensorError as exc:
        raise ValueError(f"{name} is a corrupted or truncated skpatchcore model file ({exc}).") from None
    if _digest(tensors) != meta.get("sha256"):
        raise ValueError(
            f"{name} is corrupted: its tensor data does not match the checksum recorded "
            "when it was saved."
        )
    return document, tensors


def _digest(tensors: dict[str, np.ndarray]) -> str:
    """SHA-256 of every tensor's name, dtype, shape and bytes (safetensors has no checksum)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        value = np.ascontiguousarray(tensors[key])
        digest.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.data)
    return digest.hexdigest()


def _is_dispatcher(value) -> bool:
    """A numba-compiled function: rebuilt by pynndescent itself, never stored."""
    return type(value).__module__.startswith("numba.")


class _Encoder:
    """Turns a detector into a JSON tree plus named arrays."""

    def __init__(self) -> None:
        self.tensors: dict[str, np.ndarray] = {}
        # Arrays shared between attributes are stored once. Each array is kept
        # alive here: a freed temporary's id could be reused by another array.
        self._names: dict[int, tuple[np.ndarray, str]] = {}

    def _array(self, value: np.ndarray, name: str) -> dict:
        if id(value) in self._names:
            return {"array": self._names[id(value)][1]}
        if value.dtype.kind not in "biuf":
            raise TypeError(f"Cannot save {name}: arrays of dtype {value.dtype} are not supported.")
        self._names[id(value)] = (value, name)
        self.tensors[name] = np.ascontiguousarray(value)
        return {"array": name}

    def encode(self, value, name: str):
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, np.generic):
            return value
        if isinstance(value, np.generic):
            return {"scalar": value.dtype.str, "value": value.item()}
        if isinstance(value, np.ndarray):
            return self._array(value, name)
        if isinstance(value, torch.Tensor):
            return {"tensor": self._array(value.detach().cpu().numpy(), name)["array"]}
        if isinstance(value, (tuple, list)):
            kind = "tuple" if isinstance(value, tuple) else "list"
            return {kind: [self.encode(v, f"{name}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return {"dict": {k: self.encode(v, f"{name}.{k}") for k, v in value.items()}}
        if isinstance(value, torch.device):
            return {"device": str(value)}
        if isinstance(value, np.random.RandomState):
            return {"random_state": self.encode(value.get_state(legacy=True), name)}
        if isinstance(value, type) and issubclass(value, np.generic):
            return {"numpy_type": np.dtype(value).str}
        if sp.issparse(value) and value.format == "csr":
            return {
                "csr": {
                    "data": self._array(value.data, f"{name}.data"),
                    "indices": self._array(value.indices, f"{name}.indices"),
                    "indptr": self._array(value.indptr, f"{name}.indptr"),
                    "shape": list(value.shape),
                }
            }
        if isinstance(value, torch.nn.Module):
            for key, tensor in value.state_dict().items():
                self._array(tensor.detach().cpu().numpy(), f"{name}/{key}")
            return {"network": name}
        if type(value).__name__ in _ESTIMATORS and isinstance(value, _ESTIMATORS[type(value).__name__]):
            return self._estimator(value, name)
        if type(value).__name__ == "NNDescent" and type(value).__module__.startswith("pynndescent"):
            state = {
                k: v
                for k, v in value.__getstate__().items()
                if not (_is_dispatcher(v) or isinstance(v, np.ufunc))
            }
            return {"nndescent": self.encode(state, name)}
        if _is_weights_enum(value):
            return {"torchvision_weights": f"{type(value).__name__}.{value.name}"}
        raise TypeError(
            f"Cannot save {name}: values of type {type(value).__module__}."
            f"{type(value).__qualname__} have no code-free representation."
        )

    def _estimator(self, estimator, name: str) -> dict:
        params = estimator.get_params(deep=False)
        node = {"estimator": type(estimator).__name__, "params": {}, "attributes": {}}
        for key, value in params.items():
            if isinstance(estimator, ModuleExtractor) and key == "module":
                continue  # code: the caller passes it to load
            node["params"][key] = self.encode(value, f"{name}.{key}")
        for key, value in vars(estimator).items():
            if key not in params:
                node["attributes"][key] = self.encode(value, f"{name}.{key}")
        return node


def _is_weights_enum(value) -> bool:
    from torchvision.models import WeightsEnum

    return isinstance(value, WeightsEnum)


_NODE_KINDS = (
    "scalar", "array", "tensor", "tuple", "list", "dict", "device", "random_state",
    "numpy_type", "csr", "network", "estimator", "nndescent", "torchvision_weights",
)


class _Decoder:
    """Builds objects from the JSON tree, creating only trusted classes."""

    def __init__(self, tensors: dict[str, np.ndarray], module) -> None:
        self.tensors = tensors
        self.module = module

    def _array(self, name: str) -> np.ndarray:
        if not isinstance(name, str) or name not in self.tensors:
            raise ValueError(f"the model file names a tensor {name!r} that it does not hold")
        return self.tensors[name]

    def decode(self, node, extractor=None):
        if node is None or isinstance(node, (bool, str, int, float)):
            return node
        if isinstance(node, list):
            raise ValueError("untyped list in the model file")
        kinds = [k for k in _NODE_KINDS if k in node]
        if len(kinds) != 1:
            raise ValueError(f"the model file holds a node of unknown kind {sorted(node)}")
        (kind,) = kinds
        if kind == "scalar":
            return _numeric_dtype(node["scalar"]).type(node["value"])
        if kind == "array":
            return self._array(node["array"])
        if kind == "tensor":
            return torch.from_numpy(self._array(node["tensor"]))
        if kind in ("tuple", "list"):
            items = [self.decode(v) for v in node[kind]]
            return tuple(items) if kind == "tuple" else items
        if kind == "dict":
            return {k: self.decode(v) for k, v in node["dict"].items()}
        if kind == "device":
            return torch.device(node["device"])
        if kind == "random_state":
            state = np.random.RandomState()
            state.set_state(self.decode(node["random_state"]))
            return state
        if kind == "numpy_type":
            return _numeric_dtype(node["numpy_type"]).type
        if kind == "csr":
            csr = node["csr"]
            return sp.csr_array(
                (self.decode(csr["data"]), self.decode(csr["indices"]), self.decode(csr["indptr"])),
                shape=tuple(csr["shape"]),
            )
        if kind == "torchvision_weights":
            from torchvision.models import get_weight

            return get_weight(node["torchvision_weights"])
        if kind == "network":
            return self._network(node["network"], extractor)
        if kind == "nndescent":
            return _nndescent(self.decode(node["nndescent"]))
        return self._estimator(node)

    def _estimator(self, node: dict):
        name = node["estimator"]
        if name not in _ESTIMATORS:
            raise ValueError(
                f"The model file asks for class {name!r}, which is not one skpatchcore loads "
                f"(trusted: {sorted(_ESTIMATORS)})."
            )
        cls = _ESTIMATORS[name]
        params = {k: self.decode(v) for k, v in node["params"].items()}
        if cls is ModuleExtractor:
            if self.module is None:
                raise ValueError(
                    "This detector was fitted with a ModuleExtractor, whose network is code "
                    "and is not stored: pass the same architecture as load(path, module=...); "
                    "its weights are replaced by the stored ones."
                )
            params["module"] = self.module
        estimator = cls(**params)
        extractor = params.get("feature_extractor")
        if isinstance(extractor, str):
            extractor = TorchvisionExtractor(extractor)
        for key, value in node["attributes"].items():
            setattr(estimator, key, self.decode(value, extractor))
        return estimator

    def _network(self, prefix: str, extractor) -> torch.nn.Module:
        if not isinstance(extractor, FeatureExtractor):
            raise ValueError("a network in the model file has no recorded extractor")
        # The architecture alone (random weights, nothing downloaded or read);
        # the stored weights replace them.
        architecture = extractor if isinstance(extractor, ModuleExtractor) else clone(extractor)
        if not isinstance(architecture, ModuleExtractor):
            architecture.set_params(weights=None)
        net = architecture.load()
        state = {
            key[len(prefix) + 1 :]: torch.from_numpy(value)
            for key, value in self.tensors.items()
            if key.startswith(prefix + "/")
        }
        # Files saved before built networks had their batch norms folded hold
        # the unfolded weights: load those, then fold.
        unfolded = architecture._optimized and set(state) != set(net.state_dict())
        if unfolded:
            net = architecture._load(fold_batchnorm=False)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(
                f"The stored network weights do not fit the recorded architecture ({exc})."
            ) from None
        if unfolded:
            _fold_batchnorm(net.body)  # the folded weights keep their channels-last layout
        for param in net.parameters():
            param.requires_grad_(False)
        return net


def _numeric_dtype(name: str) -> np.dtype:
    dtype = np.dtype(name)
    if dtype.kind not in "biuf":
        raise ValueError(f"the model file asks for a non-numeric dtype {name!r}")
    return dtype


def _nndescent(state: dict):
    """A pynndescent index from its stored state; its compiled functions are rebuilt."""
    from pynndescent import NNDescent

    index = NNDescent.__new__(NNDescent)
    index.__setstate__(state)
    return index
