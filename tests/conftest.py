"""Shared fixtures: tiny images and a tiny seeded CNN for fast plumbing tests."""

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from skpatchcore import ModuleExtractor

MVTEC_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec"


def tiny_cnn() -> nn.Module:
    """Three strided convolutions (strides 2, 4, 8) with seeded random weights.

    The BatchNorm (eval mode: running statistics) makes any copy or move of the
    network that ends up on batch statistics give visibly different features.
    """
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            stem=nn.Conv2d(3, 8, 3, stride=2, padding=1),
            norm0=nn.BatchNorm2d(8),
            act0=nn.ReLU(),
            layer1=nn.Conv2d(8, 16, 3, stride=2, padding=1),
            act1=nn.ReLU(),
            layer2=nn.Conv2d(16, 32, 3, stride=2, padding=1),
        )
    )


@pytest.fixture
def tiny_extractor():
    return ModuleExtractor(tiny_cnn(), ["layer1", "layer2"])


@pytest.fixture
def tiny_params(tiny_extractor):
    """Detector parameters for 32x32 inputs: an 8x8 patch grid of 48 dims."""
    return dict(feature_extractor=tiny_extractor, image_size=32, random_state=0, algorithm="exact")


@pytest.fixture(scope="session")
def textures():
    """Normal striped textures and the same with a bright square defect."""
    rng = np.random.RandomState(0)
    yy, xx = np.mgrid[:32, :32]
    normal = []
    for _ in range(16):
        phase = rng.uniform(0, 2 * np.pi)
        stripes = 0.5 + 0.25 * np.sin(xx / 2.0 + phase) + rng.normal(0, 0.02, (32, 32))
        normal.append(np.repeat(stripes[..., None], 3, axis=2))
    normal = np.clip(np.stack(normal), 0, 1).astype(np.float32)
    defective = normal[:6].copy()
    masks = np.zeros((6, 32, 32), dtype=bool)
    for i in range(6):
        top, left = rng.randint(4, 22, size=2)
        defective[i, top : top + 6, left : left + 6] = [1.0, 0.1, 0.1]
        masks[i, top : top + 6, left : left + 6] = True
    return normal, defective, masks


def require_mvtec(category: str = "bottle") -> Path:
    root = MVTEC_ROOT / category
    if not root.is_dir():
        pytest.skip(f"real MVTec AD data not found at {root} (present in CI and dev machines only)")
    return MVTEC_ROOT
