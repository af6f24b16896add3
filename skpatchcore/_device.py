"""Torch device helpers shared by the estimators: checking a device, moving a module."""

import io

import torch
from torch import nn


def check_device(device) -> torch.device:
    """``torch.device(device)``, with a clear error when CUDA is asked for but absent."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={str(device)!r} was asked for but CUDA is not available to this torch "
            f"({torch.__version__}); use device='cpu'."
        )
    return device


def module_on(module: nn.Module, device) -> nn.Module:
    """``module`` itself if its parameters and buffers are all on ``device``, else a copy there.

    ``module`` stays where it is.
    """
    device = torch.device(device)
    if all(t.device == device for t in [*module.parameters(), *module.buffers()]):
        return module
    return copy_to(module, device)


def copy_to(module: nn.Module, device) -> nn.Module:
    """A copy of ``module`` with every tensor on ``device``, through torch's serialisation.

    ``torch.load(map_location=...)`` places each tensor straight on ``device``
    as it loads, and pickling keeps what ``copy.deepcopy`` loses: a deep copy of
    torchvision's feature-extraction graph module runs its training graph
    (batch statistics) although the copy reports eval mode.
    """
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    # Our own bytes, written just above: full unpickling is safe here.
    return torch.load(buffer, map_location=device, weights_only=False)
