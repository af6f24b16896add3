"""Patch features at full resolution: the image cut into overlapping tiles.

A network sees one tile at a time, so memory is bounded by a batch of tiles
whatever the image size; the tiles' patch grids are stitched back into one
grid per image, as if the network had seen the whole image at once. Each grid
cell is taken from the tile in which it lies farthest from a tile border
(the midpoint of each overlap), so cells near a tile's zero-padded border,
whose features differ, are dropped wherever an overlap covers them.
"""

from __future__ import annotations

from collections.abc import Iterator
from numbers import Integral

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .images import to_model_input

__all__ = ["tile_layout", "iter_tiled_patch_embeddings"]


def _pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, Integral) else (int(size[0]), int(size[1]))


def tile_layout(length: int, tile: int, overlap: int, stride: int) -> list[tuple[int, int, int]]:
    """Tiles along one axis, and the grid cells each one contributes.

    Parameters
    ----------
    length : int
        Image length in pixels, a multiple of ``stride``.
    tile : int
        Tile length in pixels, a multiple of ``stride``; an image shorter
        than it is one tile of its own length.
    overlap : int
        Pixels shared by neighbouring tiles, at least; the step between tile
        starts is ``tile - overlap`` rounded down to a multiple of ``stride``
        (at least one stride), and the last tile ends at the image's end.
    stride : int
        Pixels per grid cell.

    Returns
    -------
    layout : list of (start, first, stop)
        In grid cells: the tile starts at cell ``start`` and contributes
        cells ``first:stop`` of the image's grid (``first - start:stop -
        start`` of its own). The ``first:stop`` ranges partition the grid.

    Examples
    --------
    >>> from skpatchcore.tiling import tile_layout
    >>> tile_layout(512, 256, 64, 8)  # cells: tiles of 32 starting at 0, 24, 32
    [(0, 0, 28), (24, 28, 44), (32, 44, 64)]
    """
    cells, size = length // stride, min(tile, length) // stride
    step = max(1, (tile - overlap) // stride)
    starts = list(range(0, cells - size, step)) + [cells - size]
    # A tile hands over to the next one at the middle of their overlap.
    bounds = [0] + [(prev + size + nxt) // 2 for prev, nxt in zip(starts, starts[1:])] + [cells]
    return [(start, bounds[i], bounds[i + 1]) for i, start in enumerate(starts)]


def _grid_stride(net: nn.Module, tile: tuple[int, int], embed, device) -> tuple[int, int]:
    """Pixels per grid cell of ``net``, probed on one blank tile."""
    grid = embed(net(torch.zeros(1, 3, *tile, device=device))).shape[1:3]
    if tile[0] % grid[0] or tile[1] % grid[1]:
        raise ValueError(
            f"tile_size={tile} gives a {grid[0]}x{grid[1]} patch grid: each side must be a "
            f"multiple of the backbone's stride ({tile[0] // grid[0]} pixels)."
        )
    return tile[0] // grid[0], tile[1] // grid[1]


def iter_tiled_patch_embeddings(
    net: nn.Module,
    images: np.ndarray,
    *,
    size: tuple[int, int],
    box: tuple[int, int, int, int],
    embedding_dim: int | None,
    batch_size: int,
    device="cpu",
    tile_size,
    tile_overlap: int = 32,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(batch_slice, patches)`` like :func:`~skpatchcore.features.iter_patch_embeddings`, tiled.

    Each image is resized to ``size`` and cropped to ``box`` as without
    tiling, padded at the bottom and right (reflection) to a multiple of the
    backbone's stride, and cut into ``tile_size`` tiles overlapping by at
    least ``tile_overlap`` pixels; the network runs on ``batch_size`` tiles
    at a time. The stitched grid covers the whole image at the network's
    native stride: ``ceil(height / stride) x ceil(width / stride)`` cells, as
    one forward pass over the whole image would give.

    Parameters
    ----------
    net : torch.nn.Module
        A loaded extractor (:meth:`FeatureExtractor.load`).
    images : ndarray of shape (n, H, W, C)
        From :func:`~skpatchcore.images.check_images`.
    size, box : the resize and crop of :func:`~skpatchcore.images.resized_shape`
        and :func:`~skpatchcore.images.crop_box`.
    embedding_dim : int or None
        See :func:`~skpatchcore.features.patch_embeddings`.
    batch_size : int
        Tiles per forward pass. Images are yielded in batches holding about
        that many tiles (at least one image).
    device : str or torch.device, default="cpu"
    tile_size : int or (height, width)
        Tile size in pixels of the network input; each side a multiple of
        the backbone's stride (8 for PatchCore's usual layers).
    tile_overlap : int, default=32
        Minimum overlap of neighbouring tiles, in pixels.

    Yields
    ------
    batch : slice
        Rows of ``images``.
    patches : torch.Tensor of shape (b, h, w, D), float32
    """
    from .features import patch_embeddings  # features imports this module: a late import

    def embed(maps):
        return patch_embeddings(maps, embedding_dim)

    height, width = box[2], box[3]
    tile = _pair(tile_size)
    overlap = int(tile_overlap)
    with torch.inference_mode():
        stride = _grid_stride(net, tile, embed, device)
    padded = [-(-n // s) * s for n, s in zip((height, width), stride)]
    tile = (min(tile[0], padded[0]), min(tile[1], padded[1]))  # small images: one tile
    rows = tile_layout(padded[0], tile[0], overlap, stride[0])
    cols = tile_layout(padded[1], tile[1], overlap, stride[1])
    tiles = [(r, c) for r in rows for c in cols]
    per_batch = max(1, batch_size // len(tiles))
    for first in range(0, len(images), per_batch):
        batch = slice(first, min(first + per_batch, len(images)))
        # Entered per batch, not around the yield: inference mode would leak
        # into the caller's code between batches.
        with torch.inference_mode():
            inputs = to_model_input(images[batch], size, box, device)
            inputs = F.pad(inputs, (0, padded[1] - width, 0, padded[0] - height), mode="reflect")
            patches = _stitch(net, inputs, tiles, tile, stride, embed, batch_size)
        yield batch, patches


def _stitch(net, inputs, tiles, tile, stride, embed, batch_size) -> torch.Tensor:
    """One grid per image from the grids of its tiles, ``batch_size`` tiles per forward."""
    n = len(inputs)
    cells = (inputs.shape[2] // stride[0], inputs.shape[3] // stride[1])
    out = None
    jobs = [(i, r, c) for i in range(n) for r, c in tiles]
    for chunk_start in range(0, len(jobs), batch_size):
        chunk = jobs[chunk_start : chunk_start + batch_size]
        crops = torch.stack([
            inputs[i, :, r[0] * stride[0] : r[0] * stride[0] + tile[0],
                   c[0] * stride[1] : c[0] * stride[1] + tile[1]]
            for i, r, c in chunk
        ])
        grids = embed(net(crops))
        if out is None:
            out = grids.new_empty((n, *cells, grids.shape[-1]))
        for grid, (i, (r0, r1, r2), (c0, c1, c2)) in zip(grids, chunk):
            out[i, r1:r2, c1:c2] = grid[r1 - r0 : r2 - r0, c1 - c0 : c2 - c0]
    return out
