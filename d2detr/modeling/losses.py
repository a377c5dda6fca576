"""Loss functions shared by the DETR family."""
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sigmoid_focal_loss"]


def sigmoid_focal_loss(
    inputs: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
) -> Tensor:
    """Focal loss of RetinaNet (https://arxiv.org/abs/1708.02002) on logits.

    ``targets`` has the shape of ``inputs`` and may be soft (in [0, 1]); the
    formula then is the same as torchvision's ``sigmoid_focal_loss`` / Deformable
    DETR's. ``alpha < 0`` disables the class balancing. ``reduction``: "none",
    "mean" or "sum". The DETR criterion sums and divides by the number of boxes.
    """
    inputs = inputs.float()
    targets = targets.to(inputs.dtype)
    prob = inputs.sigmoid()
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    raise ValueError(f"invalid reduction {reduction!r}")
