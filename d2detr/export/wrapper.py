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
import logging
from typing import List, Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import ImageList
from torch import Tensor, nn

from d2detr.layers.box_ops import box_cxcywh_to_xyxy

logger = logging.getLogger(__name__)

__all__ = ["ExportableDetector", "feature_strides", "min_image_size", "check_image"]


def feature_strides(model: nn.Module) -> List[int]:
    """Strides of every feature map the model's backbone and neck report (Detectron2's
    ``output_shape()`` of each submodule that has one: backbones give a dict, necks a list)."""
    strides = set()
    for module in model.modules():
        output_shape = getattr(module, "output_shape", None)
        if not callable(output_shape):
            continue
        try:
            shapes = output_shape()
        except Exception:  # a module whose output_shape needs arguments or state: not a feature source
            continue
        values = shapes.values() if isinstance(shapes, dict) else shapes
        try:
            strides.update(int(s.stride) for s in values if getattr(s, "stride", None))
        except TypeError:
            continue
    return sorted(strides)


def min_image_size(model: nn.Module) -> int:
    """Smallest image height/width an exported graph of ``model`` accepts: ``1 +`` the largest
    feature stride (64 for Deformable DETR R50's extra level: 65), so that the coarsest feature
    map has at least 2 cells. A level of one cell is what ``torch.export`` specialises on (sizes
    0 and 1 are never symbolic), so a dynamic range that includes it cannot be exported. Without
    any reported stride, 2."""
    strides = feature_strides(model)
    return max(strides) + 1 if strides else 2


def _check_image_eager(image: Tensor, min_size: int) -> Tensor:
    # Compiled by torch.jit.script (see _scripted_check), so that a traced graph keeps the
    # checks: tracing records tensor ops only and would drop Python ifs.
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(
            "expected one image tensor [3, H, W] (channels first, 3 channels), got shape "
            + str(list(image.shape))
            + "; an HWC array needs .permute(2, 0, 1), grayscale/RGBA need converting to 3 channels"
        )
    if image.shape[1] < min_size or image.shape[2] < min_size:
        raise ValueError(
            "image " + str(image.shape[1]) + "x" + str(image.shape[2]) + " is smaller than the model's minimum "
            + str(min_size) + "x" + str(min_size)
        )
    return image


_SCRIPTED_CHECK = []


def _scripted_check():
    if not _SCRIPTED_CHECK:
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)  # jit deprecation notice
            _SCRIPTED_CHECK.append(torch.jit.script(_check_image_eager))
    return _SCRIPTED_CHECK[0]


def check_image(image: Tensor, min_size: int = 1) -> Tensor:
    """Raises ``ValueError`` naming the shape unless ``image`` is ``[3, H, W]`` with ``H, W >=
    min_size``; returns it. The checks stay in the graph at run time: under
    ``torch.jit.trace`` through a scripted function, under ``torch.export`` through the
    exported program's input guards (rank, ``3`` channels, the ``Dim`` range)."""
    if not torch.jit.is_scripting():
        if torch.jit.is_tracing():
            return _scripted_check()(image, min_size)
        if torch.compiler.is_exporting():
            return image  # static rank and channels, dynamic H/W in [min, max]: torch.export's guards
    return _check_image_eager(image, min_size)


class ExportableDetector(nn.Module):
    """Wraps a DETRBase-style detector (anything with ``normalize``, ``size_divisibility``,
    ``forward_features(images, masks)`` and ``select_detections(logits, boxes)``) for export.
    The model is put in eval mode. Inputs that are not ``[3, H, W]`` are refused with a
    ``ValueError`` naming their shape, eagerly and in the exported graphs at run time (see
    :func:`check_image`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        for name in ("normalize", "forward_features", "select_detections"):
            if not hasattr(model, name):
                raise TypeError(
                    f"ExportableDetector needs a DETRBase-style model with `{name}`; got {type(model).__name__}"
                )
        self.model = model.eval()
        nms = getattr(model, "test_nms_thresh", None)
        if nms is not None:
            logger.warning(
                "%s has test_nms_thresh=%s, which eager inference applies; the exported graph returns the "
                "K top detections without NMS: apply torchvision.ops.batched_nms(boxes, scores, classes, %s) "
                "to its outputs to match eager inference.", type(model).__name__, nms, nms,
            )
            if getattr(model, "test_topk_candidates", None):
                logger.warning(
                    "eager inference runs NMS over the top test_topk_candidates=%s detections; the exported graph "
                    "returns select_box_nums_for_evaluation=%s", model.test_topk_candidates,
                    model.select_box_nums_for_evaluation,
                )
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
        image = check_image(image)
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
