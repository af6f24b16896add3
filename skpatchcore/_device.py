"""Torch device checking shared by the estimators."""

import torch


def check_device(device) -> torch.device:
    """``torch.device(device)``, with a clear error when CUDA is asked for but absent."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={str(device)!r} was asked for but CUDA is not available to this torch "
            f"({torch.__version__}); use device='cpu'."
        )
    return device
