"""Sizes that must stay dynamic when a model is captured for export."""
import torch
from torch import Tensor

__all__ = ["num_selected"]


def num_selected(k: int, scores: Tensor, dim: int = 1):
    """``min(k, scores.shape[dim])``, the size of a top-k over ``dim``, as an integer that stays
    dynamic where the graph is captured: a traced tensor under ``torch.jit.trace``, an unbacked
    size with its bounds under ``torch.export`` (a plain ``min`` would freeze the export image's
    token count into the graph, or add a guard the exporter cannot prove), a Python int otherwise.

    Two-stage models select ``min(num_queries, number of tokens)`` proposals, so a file exported
    at a large size must still run on an image with fewer tokens than queries.
    """
    if torch.jit.is_tracing():
        return torch.clamp(torch._shape_as_tensor(scores)[dim], max=k)
    if torch.compiler.is_exporting():
        n = torch.full((), scores.shape[dim], dtype=torch.int64).clamp(max=k).item()
        torch._check(n >= 1)  # an image has at least one token; lets attention rule out empty inputs
        torch._check(n <= k)
        torch._check(n <= scores.shape[dim])
        return n
    return min(k, scores.shape[dim])
