"""Focus-DETR's losses: DINO's (matching, denoising, selected encoder proposals) plus the
foreground-token loss of the selector (PyTorch release: ``two_stage_criterion.py``, weight 1.5)."""
import math
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from d2detr.layers.box_ops import box_cxcywh_to_xyxy
from d2detr.modeling.criterion import SetCriterion

from .foreground import foreground_labels, foreground_loss

__all__ = ["FocusCriterion", "OFFICIAL_FOREGROUND_STRIDES", "OFFICIAL_FOREGROUND_RANGES"]

#: Pixel strides of the four levels and the ``max(l, t, r, b)`` range ``(lo, hi]`` each level
#: labels, as in the PyTorch release (``GenTargets(strides, limit_range)``).
OFFICIAL_FOREGROUND_STRIDES = (8, 16, 32, 64)
OFFICIAL_FOREGROUND_RANGES = ((-1.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, math.inf))


class FocusCriterion(SetCriterion):
    """:class:`~d2detr.modeling.criterion.SetCriterion` plus ``loss_foreground``: the focal loss of
    the selector's logits (``outputs["foreground_logits"] [N, S]``) against FCOS-style foreground
    labels (:func:`~.foreground.foreground_labels`) of every level, weighted by
    ``weight_dict["loss_foreground"]`` (1.5).

    Args: those of ``SetCriterion``, and
        foreground_strides: pixel stride of each feature level (one per level).
        foreground_ranges: ``(lo, hi)`` object-size range of each level on ``max(l, t, r, b)``.
        foreground_alpha, foreground_gamma: of the focal loss (0.25, 2).

    The targets need ``image_size`` (``(h, w)`` of the unpadded input), which
    :class:`~.focus_detr.FocusDETR` adds: their boxes are normalised by it.
    """

    def __init__(self, *args, foreground_strides: Sequence[int] = OFFICIAL_FOREGROUND_STRIDES,
                 foreground_ranges: Sequence[Tuple[float, float]] = OFFICIAL_FOREGROUND_RANGES,
                 foreground_alpha: float = 0.25, foreground_gamma: float = 2.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.foreground_strides = tuple(int(s) for s in foreground_strides)
        self.foreground_ranges = tuple((float(lo), float(hi)) for lo, hi in foreground_ranges)
        if len(self.foreground_strides) != len(self.foreground_ranges):
            raise ValueError(f"{len(self.foreground_strides)} foreground strides but "
                             f"{len(self.foreground_ranges)} size ranges")
        if any(lo >= hi for lo, hi in self.foreground_ranges):
            raise ValueError(f"every foreground size range needs lo < hi, got {self.foreground_ranges}")
        self.foreground_alpha = foreground_alpha
        self.foreground_gamma = foreground_gamma

    def foreground_targets(self, outputs: Dict, targets: List[Dict[str, Tensor]]) -> Tensor:
        """``[N, S]`` foreground labels of every token of the batch."""
        shapes = [(int(h), int(w)) for h, w in outputs["foreground_spatial_shapes"].tolist()]
        labels = []
        for t in targets:
            if "image_size" not in t:
                raise KeyError("FocusCriterion needs targets with 'image_size' (h, w); FocusDETR.prepare_targets adds it")
            h, w = (float(v) for v in t["image_size"])
            boxes = box_cxcywh_to_xyxy(t["boxes"].float()) * t["boxes"].new_tensor([w, h, w, h])
            labels.append(foreground_labels(boxes, shapes, self.foreground_strides, self.foreground_ranges))
        return torch.stack(labels).to(outputs["foreground_logits"].device)

    def forward(self, outputs: Dict, targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        losses = super().forward(outputs, targets)
        if "foreground_logits" in outputs:
            labels = self.foreground_targets(outputs, targets)
            loss = foreground_loss(outputs["foreground_logits"].float(), labels,
                                   self.foreground_alpha, self.foreground_gamma)
            losses["loss_foreground"] = loss * self.weight_of("loss_foreground", "")
        return losses

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", foreground_strides={self.foreground_strides}, "
                f"foreground_ranges={self.foreground_ranges}")
