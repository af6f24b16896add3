"""Patch features cached on disk, so a parameter search runs the network once per image set.

In a ``GridSearchCV`` over parameters that do not touch the network
(``coreset_ratio``, ``n_neighbors``, ``algorithm``, ``contamination``,
``sigma``) every candidate extracts the same features from the same folds.
:func:`cached_patch_embeddings` stores them with ``joblib.Memory`` under a key
made of the image bytes and of what determines the network's output: the
extractor's parameters, the input size and crop, the embedding dimension,
the device type and the versions of skpatchcore and torch.
:func:`cached_coreset` stores the coreset selected from those features under
the same key, plus the coreset's parameters and seed,
so candidates that differ only in how they score (``sigma``,
``n_neighbors``, ``contamination``, ...) share one selection.

The extractor enters the key through its ``get_params``, not as an object:
``joblib.hash`` of a ``torch.nn.Module`` differs between equal copies (and
``clone`` copies a :class:`~skpatchcore.ModuleExtractor`'s module for every
candidate), so modules are keyed on their architecture (``repr``) and the
bytes of their ``state_dict``.
"""

from __future__ import annotations

import os

import joblib
import numpy as np
import torch
from sklearn.utils import gen_batches
from sklearn.utils.validation import check_memory
from torch import nn

from ._memory import empty
from .coreset import ProjectedRows
from .features import FeatureExtractor, ModuleExtractor, TorchvisionExtractor, iter_patch_embeddings
from .progress import log, progress_bar

__all__ = [
    "cached_coreset", "cached_patch_embeddings", "extractor_token", "feature_key", "load_network",
]


def _module_token(module: nn.Module) -> tuple[str, str]:
    """Architecture and weights of a module, equal for equal copies."""
    state = {}
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu()
        state[name] = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    return repr(module), joblib.hash(state)


def _value_token(value):
    if isinstance(value, nn.Module):
        return _module_token(value)
    if isinstance(value, (str, os.PathLike)) and os.path.isfile(value):
        # A weights file: its content may change under the same name.
        stat = os.stat(value)
        return os.fspath(value), stat.st_size, stat.st_mtime_ns
    return value


def extractor_token(extractor: str | FeatureExtractor) -> str:
    """A hash of a feature extractor's configuration, equal for equal copies.

    Parameters
    ----------
    extractor : str or FeatureExtractor
        As the detector's ``feature_extractor`` parameter; a str names a
        :class:`~skpatchcore.TorchvisionExtractor`.

    Returns
    -------
    token : str
        Changes with the extractor's class, any of its parameters, and for
        ``torch.nn.Module`` parameters with their ``repr`` or weights; for a
        weights file, with its size or modification time.
    """
    if isinstance(extractor, str):
        extractor = TorchvisionExtractor(extractor)
    params = {name: _value_token(value) for name, value in extractor.get_params(deep=False).items()}
    cls = type(extractor)
    return joblib.hash((f"{cls.__module__}.{cls.__qualname__}", params))


# The last network built for a detector with a feature cache, by extractor token and device.
_LAST_NETWORK: dict[tuple[str, str], nn.Module] = {}


def load_network(extractor: FeatureExtractor, memory, device="cpu") -> nn.Module:
    """``extractor.load()`` on ``device``, built once per process for detectors with a feature cache.

    In a cached search every candidate's fit reads its features from the
    cache, yet each fitted detector holds a network: building Lite0 (timm
    model, weights, traced graph) took 0.34-0.45 s, a deep copy of a built
    one 0.10-0.13 s, either of them more than a candidate's coreset at
    128 px. With ``memory`` set, the last network built is kept and every
    later fit with the same extractor token and device shares it. The
    network is frozen and only run in inference, and every use moves it to
    its own device first, so sharing cannot change any detector's output.
    A :class:`~skpatchcore.ModuleExtractor` always wraps its own module.

    Parameters
    ----------
    extractor : FeatureExtractor
    memory : None, str or joblib.Memory
        The detector's ``memory`` parameter.
    device : str or torch.device, default="cpu"
        Where the network is placed.

    Returns
    -------
    net : torch.nn.Module
        On ``device``; the fit's own without ``memory``, else shared.
    """
    if check_memory(memory).location is None or isinstance(extractor, ModuleExtractor):
        return extractor.load().to(device)
    key = (extractor_token(extractor), str(torch.device(device)))
    if key not in _LAST_NETWORK:
        _LAST_NETWORK.clear()  # one network at a time: a search uses one extractor
        _LAST_NETWORK[key] = extractor.load()
    # Scoring on another device moves a detector's network there in place.
    return _LAST_NETWORK[key].to(device)


def _all_patch_embeddings(
    net, images, *, size, box, embedding_dim, tile_size, tile_overlap, batch_size, device,
    verbose, extractor, device_type, versions,
) -> np.ndarray:
    """All patch features ``(n, h, w, D)`` in one float32 array.

    ``extractor`` (a token), ``device_type`` and ``versions`` are only part of
    the cache key.
    """
    out = None
    batches = iter_patch_embeddings(
        net, images, size=size, box=box, embedding_dim=embedding_dim, batch_size=batch_size,
        device=device, tile_size=tile_size, tile_overlap=tile_overlap,
    )
    for batch, patches in _with_progress(batches, len(images), verbose):
        if out is None:
            out = empty((len(images), *patches.shape[1:]))
        out[batch] = patches.cpu().numpy()
    return out


def cached_patch_embeddings(
    memory,
    extractor: str | FeatureExtractor,
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
    verbose=0,
):
    """:func:`~skpatchcore.features.iter_patch_embeddings`, cached in ``memory``.

    Parameters
    ----------
    memory : None, str or joblib.Memory
        As ``Pipeline(memory=...)``: None (or a Memory without location)
        caches nothing and streams the batches as they are computed.
    extractor : str or FeatureExtractor
        The configuration ``net`` was loaded from; it keys the cache in
        place of the network.
    net : torch.nn.Module
        The loaded network, run only on a cache miss.
    images : ndarray of shape (n, H, W, C)
        From :func:`~skpatchcore.images.check_images`; keyed on their bytes.
    size, box, embedding_dim, batch_size, device, tile_size, tile_overlap
        As for ``iter_patch_embeddings``; ``batch_size`` is not part of the
        key, the device's type is.
    verbose : int, default=0
        Show a progress bar of the images through the network.

    Yields
    ------
    batch : slice
        Positions in ``images``.
    patches : torch.Tensor of shape (b, h, w, D), float32
        On the CPU when read from the cache.
    """
    memory = check_memory(memory)
    if memory.location is None:
        yield from _with_progress(
            iter_patch_embeddings(
                net, images, size=size, box=box, embedding_dim=embedding_dim,
                batch_size=batch_size, device=device, tile_size=tile_size,
                tile_overlap=tile_overlap,
            ),
            len(images), verbose,
        )
        return
    compute = memory.cache(_all_patch_embeddings, ignore=["net", "batch_size", "device", "verbose"])
    key = feature_key(
        extractor, size=size, box=box, embedding_dim=embedding_dim, device=device,
        tile_size=tile_size, tile_overlap=tile_overlap,
    )
    if verbose and compute.check_call_in_cache(net, images, batch_size=batch_size, device=device, verbose=0, **key):
        log(f"patch features of {len(images)} images read from {memory.location}", verbose)
    patches = compute(net, images, batch_size=batch_size, device=device, verbose=verbose, **key)
    for batch in gen_batches(len(images), batch_size):
        yield batch, torch.from_numpy(patches[batch])


def feature_key(
    extractor: str | FeatureExtractor, *, size, box, embedding_dim, device, tile_size, tile_overlap
) -> dict:
    """What, besides the images, determines their patch features: a cache key.

    The versions of skpatchcore and torch are part of it: a new release may
    compute features differently (e.g. batch norms folded into the
    convolutions change them by float32 rounding).
    """
    from . import __version__

    return dict(
        size=tuple(size), box=tuple(box), embedding_dim=embedding_dim,
        tile_size=tile_size, tile_overlap=tile_overlap if tile_size is not None else None,
        extractor=extractor_token(extractor), device_type=torch.device(device).type,
        versions=(__version__, torch.__version__),
    )


def _coreset_selection(
    projected, images, *, coreset_ratio, method, seed, projection_dim, batch_size, features
):
    """The selected rows of ``projected``; every other argument is only part of the cache key."""
    indices, _ = projected.select(coreset_ratio, method=method)
    return indices


def cached_coreset(
    memory,
    projected: ProjectedRows,
    images: np.ndarray,
    *,
    coreset_ratio: float,
    method: str,
    seed: int,
    projection_dim: int | None,
    batch_size: int,
    features,
) -> np.ndarray:
    """``projected.select(coreset_ratio, method=method)`` indices, cached in ``memory``.

    A greedy coreset depends only on the projected patch features, so it is
    keyed on what makes them: the training images' bytes, their
    :func:`feature_key` and the projection (``projection_dim``, ``seed``,
    which also draws the start row, and ``batch_size``: rows are projected
    batch by batch, shifted by the first batch's mean), plus
    ``coreset_ratio`` and ``method``.
    Hashing the images costs far less than hashing the features: at 128 px
    a selection took 46 ms, and in a 6-candidate search over ``coreset_ratio``
    and ``sigma`` half the selections repeat one made before.

    Parameters
    ----------
    memory : None, str or joblib.Memory
        None (or a Memory without location) selects without caching.
    projected : ProjectedRows
        Filled with the patch features of ``images``; read only on a miss.
    images : ndarray of shape (n, H, W, C)
        The training images the features came from.
    coreset_ratio, method
        As :meth:`ProjectedRows.select`.
    seed, projection_dim, batch_size
        The ``random_state``, ``projection_dim`` and images per batch
        ``projected`` was made with.
    features : callable
        Returns the :func:`feature_key` of the features; called only when
        caching (an extractor's token hashes a module's weights).

    Returns
    -------
    indices : ndarray of shape (n_selected,), int64
        Selected rows, in selection order.
    """
    memory = check_memory(memory)
    if memory.location is None:
        return projected.select(coreset_ratio, method=method)[0]
    return memory.cache(_coreset_selection, ignore=["projected"])(
        projected, images, coreset_ratio=coreset_ratio, method=method, seed=seed,
        projection_dim=projection_dim, batch_size=batch_size, features=features(),
    )


def _with_progress(batches, total: int, verbose):
    with progress_bar(total, "patch features", verbose) as bar:
        for batch, patches in batches:
            yield batch, patches
            bar.update(batch.stop - batch.start)
