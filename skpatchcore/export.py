"""ONNX export of a fitted detector's scoring: one graph from images to scores and maps.

The serving side then needs only ``onnxruntime``, not torch: the graph holds
the backbone, the patch embedding (paper Eq. 1-2), the exact nearest distance
of every patch to the memory bank as one matrix product, the reweighting of
Eq. 7 and the maps' upsampling and Gaussian smoothing, with the bank and its
neighbour table as constants.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.validation import check_is_fitted
from torch import nn

from ._device import module_on
from .detector import PatchCoreDetector
from .features import patch_embeddings
from .images import crop_box, resized_shape
from .maps import anomaly_maps

__all__ = ["export_onnx"]

#: ONNX operator set of the exported graph (Resize with antialiasing needs 18).
OPSET = 18


class _Scorer(nn.Module):
    """The detector's scoring of ``(n, H, W, C)`` float images in [0, 1], as traceable torch."""

    def __init__(self, detector: PatchCoreDetector, image_shape: tuple[int, int]) -> None:
        super().__init__()
        self.net = module_on(detector.feature_extractor_, "cpu")
        self.size = resized_shape(image_shape, detector.image_size, detector.image_size_rule)
        self.box = crop_box(self.size, detector.crop_size)
        self.image_shape = tuple(image_shape)
        self.sigma = float(detector.sigma)
        # Antialiased resizing (not in ONNX's exporters) is linear and separable:
        # the matrices torch's own resize applies to each column and row.
        self.register_buffer("resize_rows", _resize_matrix(image_shape[0], self.size[0]))
        self.register_buffer("resize_cols", _resize_matrix(image_shape[1], self.size[1]))
        dim = detector.memory_bank_.shape[1]
        self.register_buffer("bank", torch.from_numpy(np.array(detector.memory_bank_)))
        self.register_buffer("bank_sq_norms", torch.einsum("ij,ij->i", self.bank, self.bank))
        self.n_support = min(detector.n_neighbors, len(detector.memory_bank_))
        # Channel pooling (Eq. 2) is linear: as a (D_in, D) matrix it exports as one
        # MatMul, where adaptive pooling to a size that does not divide D_in would not.
        embedding_dim = detector.embedding_dim
        n_channels = self._n_channels()
        if embedding_dim is not None and embedding_dim < n_channels:
            eye = torch.eye(n_channels)[:, None, :]
            pooling = F.adaptive_avg_pool1d(eye, embedding_dim)[:, 0, :]
        else:
            pooling = torch.eye(n_channels)
        if pooling.shape[1] != dim:
            raise ValueError(f"Patch features of {pooling.shape[1]} dims do not match the bank's {dim}.")
        self.register_buffer("pooling", pooling)

    def _n_channels(self) -> int:
        top, left, height, width = self.box
        with torch.inference_mode():
            maps = self.net(torch.zeros(1, 3, height, width))
        return sum(fmap.shape[1] for fmap in maps)

    def forward(self, images: torch.Tensor):
        n = images.shape[0]
        x = images.permute(0, 3, 1, 2)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(self.image_shape) != tuple(self.size):
            x = (self.resize_rows @ x @ self.resize_cols.T).clamp(0.0, 1.0)
        top, left, height, width = self.box
        x = x[:, :, top : top + height, left : left + width]
        patches = patch_embeddings(self.net(x), None) @ self.pooling  # (n, h, w, D)
        h, w, dim = patches.shape[1:]
        flat = patches.reshape(n, h * w, dim)
        # Exact nearest bank entry of every patch, by the expansion of the squared distance.
        sq = (flat * flat).sum(-1, keepdim=True) - 2.0 * flat @ self.bank.T + self.bank_sq_norms
        nearest_sq, nearest = sq.min(dim=2)
        patch_dist = nearest_sq.clamp(min=0.0).sqrt()  # (n, h*w)
        # Eq. 6-7: the most anomalous patch, weighed against the neighbours of its entry.
        patch = patch_dist.argmax(dim=1)
        rows = torch.arange(n)
        worst = flat[rows, patch]  # (n, D)
        # The b nearest bank entries of m*, m* itself first (as the detector searches them).
        m_star = self.bank[nearest[rows, patch]]  # (n, D)
        m_sq = (m_star * m_star).sum(-1, keepdim=True) - 2.0 * m_star @ self.bank.T + self.bank_sq_norms
        support = self.bank[m_sq.topk(self.n_support, dim=1, largest=False).indices]  # (n, b, D)
        dist = torch.linalg.vector_norm(support - worst[:, None, :], dim=2)
        if dist.shape[1] < 2:
            scores = dist[:, 0]
        else:
            scores = (1.0 - torch.softmax(dist, dim=1)[:, 0]) * dist[:, 0]
        maps = anomaly_maps(
            patch_dist.reshape(n, h, w), model_size=self.size, box=self.box,
            output_size=self.image_shape, sigma=self.sigma,
        )
        return -scores, maps


def _resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``(n_out, n_in)`` matrix of the antialiased bilinear resize of a length-``n_in`` axis."""
    # One unit vector per image, three pixels wide: torch's antialiased kernel
    # mis-handles one-pixel-wide images, and a width kept as it is is not resampled.
    basis = torch.eye(n_in)[:, None, :, None].repeat(1, 1, 1, 3)
    resized = F.interpolate(basis, size=(n_out, 3), mode="bilinear", antialias=True, align_corners=False)
    return resized[:, 0, :, 0].T.contiguous()


def export_onnx(detector: PatchCoreDetector, path: str | os.PathLike, *, image_shape=None) -> None:
    """Write a fitted detector's scoring as one ONNX graph.

    Parameters
    ----------
    detector : PatchCoreDetector
        Fitted.
    path : str or path-like
        The ``.onnx`` file to write.
    image_shape : (H, W), default=None
        Size of the images the graph takes (resizing, crop and map size are
        fixed for it); None uses the training images' size.

    Notes
    -----
    The graph's input ``images`` is float32 ``(batch, H, W, C)`` in ``[0, 1]``
    with ``C`` the training images' channel count (divide 8-bit images by 255);
    the batch size is free. Its outputs are ``score_samples`` ``(batch,)``,
    as :meth:`PatchCoreDetector.score_samples` (compare with ``offset_`` to
    decide), and ``anomaly_maps`` ``(batch, H, W)``, as
    :meth:`PatchCoreDetector.anomaly_maps`. The nearest-neighbour search in the
    graph is exact whatever ``algorithm`` the detector uses. Needs the
    ``onnx`` extra: ``pip install 'skpatchcore[onnx]'``.

    Examples
    --------
    >>> from skpatchcore import export_onnx
    >>> export_onnx(detector, "bottle.onnx")  # doctest: +SKIP
    >>> import onnxruntime  # doctest: +SKIP
    >>> session = onnxruntime.InferenceSession("bottle.onnx")  # doctest: +SKIP
    >>> scores, maps = session.run(None, {"images": X.astype("float32") / 255})  # doctest: +SKIP
    """
    check_is_fitted(detector)
    try:
        import onnx  # noqa: F401 - torch's exporter needs both
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "ONNX export needs onnx and onnxscript: pip install 'skpatchcore[onnx]'."
        ) from exc
    height, width, channels = detector.image_shape_
    if image_shape is not None:
        height, width = image_shape[:2]
    scorer = _Scorer(detector, (height, width)).eval()
    example = torch.rand(2, height, width, channels)
    with torch.no_grad():
        torch.onnx.export(
            scorer,
            (example,),
            os.fspath(path),
            input_names=["images"],
            output_names=["score_samples", "anomaly_maps"],
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            opset_version=OPSET,
            dynamo=True,
            external_data=False,  # one self-contained file
            verbose=False,
        )
