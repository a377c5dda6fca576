"""Coordinates under mixed precision.

Under ``torch.autocast`` (bfloat16 on CPU, float16/bfloat16 on CUDA) linear layers return
half-precision tensors. For features that is what autocast is for; for coordinates it is not:
a bfloat16 value in [0.5, 1) is a multiple of 2**-8, so on a 167-cell feature level a float32
reference point rounded to bfloat16 is up to 0.32 of a cell off, and a cell-centre grid built in
bfloat16 up to 0.81. Reference points, valid ratios, proposal grids and the
heads that produce reference points therefore stay (at least) float32.
"""
import torch
from torch import Tensor, nn

__all__ = ["geometry_dtype", "geometry_forward"]


def geometry_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of reference points, valid ratios and proposal grids for features of ``dtype``:
    float32 for half / bfloat16 (autocast), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def geometry_forward(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` for a head whose output is a coordinate (e.g. the reference-point head):
    under autocast it runs with autocast off on ``x`` in :func:`geometry_dtype`, so the result
    is float32; otherwise it is plain ``module(x)`` (traced and exported graphs are unchanged)."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return module(x)
    with torch.autocast(device_type, enabled=False):
        return module(x.to(geometry_dtype(x.dtype)))
