"""Bounding-box utilities shared by every DETR-family method.

Boxes are either ``cxcywh`` (centre x, centre y, width, height) or ``xyxy``
(x0, y0, x1, y1); all functions work on the last dimension and any leading shape.
"""
import torch
from torch import Tensor

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_area",
    "box_iou",
    "generalized_box_iou",
    "inverse_sigmoid",
]


def box_cxcywh_to_xyxy(x: Tensor) -> Tensor:
    cx, cy, w, h = x.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(x: Tensor) -> Tensor:
    x0, y0, x1, y1 = x.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of ``xyxy`` boxes, shape ``[...]``."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor):
    """Pairwise IoU of ``xyxy`` boxes ``[N,4]`` x ``[M,4]``.

    Returns ``(iou [N,M], union [N,M])`` as in DETR's ``box_ops.box_iou``.
    """
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    iou = inter / union
    return iou, union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU (https://giou.stanford.edu/) of ``xyxy`` boxes.

    ``[N,4]`` x ``[M,4]`` -> ``[N,M]``. Degenerate boxes (x1 < x0) give inf/nan
    results, so callers must not pass them; this is checked when not tracing.
    """
    if not torch.jit.is_tracing() and not torch.jit.is_scripting():
        # The checks sync with the device; they are cheap next to a matcher/loss.
        assert (boxes1[:, 2:] >= boxes1[:, :2]).all(), "boxes1 has degenerate boxes"
        assert (boxes2[:, 2:] >= boxes2[:, :2]).all(), "boxes2 has degenerate boxes"
    iou, union = box_iou(boxes1, boxes2)
    lt = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    area = wh[..., 0] * wh[..., 1]
    return iou - (area - union) / area


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``log(x / (1 - x))`` with ``x`` clamped to [0, 1] and both terms to >= eps.

    eps = 1e-5 as in the official Deformable DETR / DINO (detrex uses 1e-3).
    """
    x = x.clamp(min=0, max=1)
    x1 = x.clamp(min=eps)
    x2 = (1 - x).clamp(min=eps)
    return torch.log(x1 / x2)
