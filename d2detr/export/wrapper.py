"""A tensor-in / tensor-out wrapper around any :class:`~d2detr.modeling.meta_arch.DETRBase`
detector, the form that is traced, scripted and ``torch.export``-ed.

``ExportableDetector(model)(image)`` takes one image ``[3, H, W]`` (uint8 or float, 0-255, in
the model's ``input_format`` channel order, any ``H``/``W``) and returns ``(boxes [K, 4] XYXY in
that image's pixels, clipped to it; scores [K]; classes [K] int64)``, the ``K =
select_box_nums_for_evaluation`` best detections in descending score order. Normalisation,
padding to the model's ``size_divisibility``, the padding mask and the post-processing run
inside the graph with tensor ops only (no Python ints taken from shapes, no ``.item()``), so the
graph stays valid for image sizes other than the one it was exported with.

It matches ``model([{"image": image}])`` (Detectron2's eager inference) box for box, except
that Detectron2's ``detector_postprocess`` additionally drops boxes that are empty after
clipping; the wrapper keeps a fixed number ``K`` of detections (filter by score downstream).
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import ImageList
from torch import Tensor, nn

from d2detr.layers.box_ops import box_cxcywh_to_xyxy

__all__ = ["ExportableDetector"]


class ExportableDetector(nn.Module):
    """Wraps a DETRBase-style detector (anything with ``normalize``, ``size_divisibility``,
    ``forward_features(images, masks)`` and ``select_detections(logits, boxes)``) for export.
    The model is put in eval mode."""

    def __init__(self, model: nn.Module):
        super().__init__()
        for name in ("normalize", "forward_features", "select_detections"):
            if not hasattr(model, name):
                raise TypeError(
                    f"ExportableDetector needs a DETRBase-style model with `{name}`; got {type(model).__name__}"
                )
        self.model = model.eval()
        self.size_divisibility = int(getattr(model, "size_divisibility", 0) or 0)
        self.needs_targets = bool(getattr(model, "forward_features_needs_targets", False))

    def preprocess(self, image: Tensor) -> Tuple[ImageList, Tensor, Tensor]:
        """``image [3,H,W]`` -> ``(ImageList [1,3,H',W'] normalised and padded, mask [1,H',W']
        True on padding, size [2] float (h, w) of the unpadded image)``."""
        x = self.model.normalize(image)
        valid = torch.ones_like(x[:1])
        d = self.size_divisibility
        if d > 1:
            # Under torch.jit.trace the sizes are traced 0-d tensors, under torch.export
            # symbolic ints: this arithmetic stays dynamic in both.
            pad_h = (d - x.shape[-2] % d) % d
            pad_w = (d - x.shape[-1] % d) % d
            x = F.pad(x, (0, pad_w, 0, pad_h), value=0.0)  # zeros after normalisation, as DETR
            valid = F.pad(valid, (0, pad_w, 0, pad_h), value=0.0)
        valid = valid > 0.5  # [1, H', W']
        h = valid[0, :, 0].sum()
        w = valid[0, 0, :].sum()
        images = ImageList(x[None], [(image.shape[-2], image.shape[-1])])
        return images, ~valid, torch.stack([h, w]).to(x.dtype)

    def forward(self, image: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        images, masks, size = self.preprocess(image)
        if self.needs_targets:
            outputs = self.model.forward_features(images, masks, targets=None)
        else:
            outputs = self.model.forward_features(images, masks)
        scores, classes, boxes = self.model.select_detections(
            outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        )
        h, w = size[0], size[1]
        scale = torch.stack([w, h, w, h])
        boxes = box_cxcywh_to_xyxy(boxes[0]) * scale
        boxes = torch.minimum(boxes.clamp(min=0), scale)  # Detectron2's Boxes.clip
        return boxes, scores[0], classes[0]
