"""Loss functions shared by the DETR family."""
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sigmoid_focal_loss", "varifocal_loss"]


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    raise ValueError(f"invalid reduction {reduction!r}")


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
    return _reduce(loss, reduction)


def varifocal_loss(
    inputs: Tensor,
    quality_targets: Tensor,
    alpha: float = 0.75,
    gamma: float = 2.0,
    reduction: str = "none",
) -> Tensor:
    """Varifocal loss of VarifocalNet (https://arxiv.org/abs/2008.13367) on logits.

    ``quality_targets`` has the shape of ``inputs``: the IoU of the matched prediction with its
    target at the target's class, 0 elsewhere. Positives (q > 0) are binary cross-entropy towards
    q weighted by q; negatives are down-weighted by ``alpha * p**gamma`` as in the focal loss, but
    positives are not, so a well-localised prediction is pushed to a high score and the score
    ranks by localisation quality (used by RT-DETR on DETR queries).
    """
    inputs = inputs.float()
    q = quality_targets.to(inputs.dtype)
    if torch.any((q < 0) | (q > 1)):
        raise ValueError("varifocal_loss: quality targets must lie in [0, 1]")
    prob = inputs.sigmoid().detach()
    positive = (q > 0).to(inputs.dtype)
    weight = alpha * prob.pow(gamma) * (1 - positive) + q
    loss = F.binary_cross_entropy_with_logits(inputs, q, weight=weight, reduction="none")
    return _reduce(loss, reduction)
