"""Sizes that must stay dynamic when a model is captured for export."""
import torch
from torch import Tensor

__all__ = ["num_selected", "count_from_tensor"]


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


def count_from_tensor(count: Tensor, upper: int):
    """A size computed from data -- ``count``, a 0-d integer tensor in ``[1, upper]`` -- in the form
    a top-k or a slice takes where the graph is captured: the tensor itself under
    ``torch.jit.trace`` (so the traced graph recomputes it), an unbacked size with those bounds
    under ``torch.export``, a Python int otherwise.

    Focus-DETR keeps a fraction of each image's *valid* tokens: the count depends on the padding
    mask, not only on shapes, so an exported file must still compute it at run time.
    """
    if torch.jit.is_tracing():
        return count
    if torch.compiler.is_exporting():
        n = count.item()
        torch._check(n >= 1)
        torch._check(n <= upper)
        return n
    return int(count)
