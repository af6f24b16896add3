"""Pixel-level anomaly maps from patch scores (paper Sec. 3.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["anomaly_maps", "gaussian_blur"]


def anomaly_maps(
    patch_scores: torch.Tensor,
    *,
    model_size: tuple[int, int],
    box: tuple[int, int, int, int],
    output_size: tuple[int, int],
    sigma: float = 4.0,
) -> torch.Tensor:
    """Upsample patch scores to pixels and smooth them, aligned with the input.

    Parameters
    ----------
    patch_scores : torch.Tensor of shape (n, h, w)
        Nearest-neighbour distance of each patch.
    model_size : (H', W')
        Size of the resized image the network saw before cropping.
    box : (top, left, height, width)
        The centre crop inside ``model_size`` that was fed to the network.
    output_size : (H, W)
        The caller's image size; the map is resized back to it so that its
        pixels line up with the input's.
    sigma : float, default=4.0
        Gaussian smoothing in pixels of the network's input, as the paper.

    Returns
    -------
    maps : torch.Tensor of shape (n, H, W), float32
        Outside a centre crop, where the network saw nothing, maps are 0.
    """
    top, left, height, width = box
    maps = F.interpolate(
        patch_scores[:, None].float(), size=(height, width), mode="bilinear", align_corners=False
    )
    if sigma > 0 and min(height, width) > 1:
        # Kernel covering +-4 sigma, as scipy.ndimage.gaussian_filter's default,
        # truncated on small maps where reflect padding needs radius < size.
        radius = min(int(4.0 * sigma + 0.5), height - 1, width - 1)
        maps = gaussian_blur(maps, sigma, radius)
    if (height, width) != tuple(model_size):
        framed = maps.new_zeros((maps.shape[0], 1, *model_size))
        framed[:, :, top : top + height, left : left + width] = maps
        maps = framed
    if tuple(model_size) != tuple(output_size):
        maps = F.interpolate(maps, size=output_size, mode="bilinear", align_corners=False)
    return maps[:, 0]


def gaussian_blur(maps: torch.Tensor, sigma: float, radius: int) -> torch.Tensor:
    """Gaussian smoothing of ``(n, 1, H, W)`` maps, reflect-padded, as two banded products.

    The same kernel (normalised samples of the Gaussian at ``-radius..radius``)
    and padding as torchvision's ``gaussian_blur``, applied along rows and
    columns as matrix products with banded matrices. torchvision convolves
    with the full 2-D kernel, and on the CPU that convolution unfolds its
    input: for 100 maps of 256 x 256 and sigma 4 it took 550 MB and 4 times
    longer; these products need no more than the maps themselves.

    Parameters
    ----------
    maps : torch.Tensor of shape (n, 1, H, W)
    sigma : float
    radius : int
        Half-width of the kernel, below ``H`` and ``W``.

    Returns
    -------
    blurred : torch.Tensor of shape (n, 1, H, W)
    """
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    padded = F.pad(maps, (radius, radius, radius, radius), mode="reflect")[:, 0]
    height, width = maps.shape[-2:]
    return (_banded(kernel, height) @ padded @ _banded(kernel, width).T)[:, None]


def _banded(kernel: torch.Tensor, n: int) -> torch.Tensor:
    """``(n, n + len(kernel) - 1)`` matrix whose row ``i`` holds ``kernel`` from column ``i``."""
    band = kernel.new_zeros(n, n + len(kernel) - 1)
    rows = torch.arange(n, device=kernel.device)
    for offset, weight in enumerate(kernel):
        band[rows, rows + offset] = weight
    return band
