"""The Detectron2-facing part shared by every DETR-family detector.

A method subclasses :class:`DETRBase` and implements only
``forward_features(images, masks) -> outputs`` (plus, if it needs them, a
``targets`` argument, see :attr:`DETRBase.forward_features_needs_targets`).
The base class does Detectron2's I/O: input normalisation and padding, target
preparation, losses through the criterion, and inference to ``Instances`` in
the original image's coordinates.

``outputs`` contract: ``pred_logits [B,Q,C]`` (``C = num_classes`` with sigmoid /
focal classification, ``num_classes + 1`` with softmax, the last being
no-object), ``pred_boxes [B,Q,4]`` normalised (cx, cy, w, h) relative to the
*unpadded* image, optionally ``aux_outputs`` (list of such dicts) and
``enc_outputs`` (dict) for the criterion, plus any method-specific entries.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.layers import batched_nms
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from torch import Tensor, nn

from d2detr.layers.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from d2detr.layers.dynamic_shapes import num_selected

__all__ = ["DETRBase", "aux_outputs_list", "init_focal_heads"]


def aux_outputs_list(outputs_class: Sequence[Tensor], outputs_coord: Sequence[Tensor]) -> List[Dict[str, Tensor]]:
    """Per-layer ``(logits, boxes)`` (stacked ``[L,...]`` or lists) -> the ``aux_outputs`` list of
    the criterion: one ``{"pred_logits", "pred_boxes"}`` dict per layer except the last."""
    return [{"pred_logits": a, "pred_boxes": b} for a, b in zip(outputs_class[:-1], outputs_coord[:-1])]


def init_focal_heads(class_embed: nn.Linear, bbox_embed: nn.Module, prior_prob: float = 0.01) -> None:
    """The focal-loss initialisation of Deformable DETR and its successors: the class bias at
    the foreground prior ``prior_prob`` and the box MLP's last layer (``bbox_embed.layers[-1]``)
    at zero."""
    nn.init.constant_(class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
    nn.init.zeros_(bbox_embed.layers[-1].weight)
    nn.init.zeros_(bbox_embed.layers[-1].bias)


class DETRBase(nn.Module):
    """Base meta-architecture (Detectron2's ``forward(batched_inputs)`` contract).

    Args:
        backbone: a Detectron2 ``Backbone`` (stored as ``self.backbone``; subclasses use it).
        criterion: a ``SetCriterion``-like module ``(outputs, targets) -> dict`` of weighted
            losses; may be None for inference-only models.
        num_classes: number of object classes (without no-object).
        pixel_mean, pixel_std: per-channel statistics in **RGB** order, 0-255 scale.
        select_box_nums_for_evaluation: detections kept per image (top-k scores).
        use_focal: sigmoid classification with top-k over queries x classes (Deformable
            DETR and later); False: softmax, drop the no-object class, one box per query (DETR).
        size_divisibility: pad the batch to a multiple of this (0: no constraint beyond
            the backbone's own ``size_divisibility``).
        input_format: channel order of the ``image`` tensors the mapper produces
            ("RGB" or "BGR"); BGR inputs are flipped to RGB before normalisation.
        test_nms_thresh: None (the papers' set prediction: no NMS), or an IoU threshold in (0, 1]
            for class-wise NMS over the selected detections at inference, as Detectron2's
            ``test_nms_thresh``: for briefly trained models whose one-to-one matching has not
            yet removed duplicate boxes. Eager inference only; exported graphs keep all ``K``.
        test_topk_candidates: with ``test_nms_thresh``, how many top-scoring detections go into
            NMS, of which the ``select_box_nums_for_evaluation`` best survivors are kept (as
            Detectron2's RetinaNet: ``test_topk_candidates`` before NMS, then
            ``max_detections_per_image``); None: ``select_box_nums_for_evaluation``, so NMS only
            removes detections. No effect without NMS (the top ``K`` are the same).
    """

    #: Set to True in a subclass whose ``forward_features`` takes a ``targets`` keyword
    #: (e.g. denoising queries); it receives the prepared targets in training, None otherwise.
    forward_features_needs_targets: bool = False

    def __init_subclass__(cls, **kwargs):
        """Every concrete meta-architecture lands in Detectron2's ``META_ARCH_REGISTRY`` under its
        class name (``*Base`` classes are abstract and skipped), so
        ``META_ARCH_REGISTRY.get("DINO")`` finds it once its project is imported."""
        super().__init_subclass__(**kwargs)
        if cls.__name__.endswith("Base"):
            return
        existing = META_ARCH_REGISTRY._obj_map.get(cls.__name__)
        if existing is None:
            META_ARCH_REGISTRY.register(cls)
        elif existing.__qualname__ != cls.__qualname__ or existing.__module__.split(".")[-1] != cls.__module__.split(".")[-1]:
            # (The same file imported twice under two package names, the checkout's
            # ``projects.<name>`` and ``d2detr.projects.<name>``, is the same model: silent.)
            import logging

            logging.getLogger(__name__).warning(
                "META_ARCH_REGISTRY: %r is taken by %s.%s; %s.%s is not registered (give it another name)",
                cls.__name__, existing.__module__, existing.__qualname__, cls.__module__, cls.__qualname__,
            )

    def __init__(
        self,
        *,
        backbone: nn.Module,
        criterion: Optional[nn.Module],
        num_classes: int,
        pixel_mean: Sequence[float] = (123.675, 116.280, 103.530),
        pixel_std: Sequence[float] = (58.395, 57.120, 57.375),
        select_box_nums_for_evaluation: int = 100,
        use_focal: bool = False,
        size_divisibility: int = 0,
        input_format: str = "RGB",
        test_nms_thresh: Optional[float] = None,
        test_topk_candidates: Optional[int] = None,
    ):
        super().__init__()
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"input_format must be 'RGB' or 'BGR', got {input_format!r}")
        if test_nms_thresh is not None and (
            isinstance(test_nms_thresh, (str, bool)) or not 0.0 < test_nms_thresh <= 1.0
        ):
            # a string here is usually "None" from the command line, whose grammar spells it null
            raise ValueError(
                "test_nms_thresh must be None (model.test_nms_thresh=null on the command line) or an IoU "
                f"threshold in (0, 1], got {test_nms_thresh!r}"
            )
        self.test_nms_thresh = test_nms_thresh
        if test_topk_candidates is not None and (
            isinstance(test_topk_candidates, (str, bool)) or test_topk_candidates < select_box_nums_for_evaluation
        ):
            raise ValueError(
                "test_topk_candidates must be None (model.test_topk_candidates=null on the command line) or at "
                f"least select_box_nums_for_evaluation ({select_box_nums_for_evaluation}), got {test_topk_candidates!r}"
            )
        self.test_topk_candidates = test_topk_candidates
        if len(pixel_mean) != 3 or len(pixel_std) != 3:
            raise ValueError("pixel_mean and pixel_std need 3 values (RGB)")
        self.backbone = backbone
        self.criterion = criterion
        self.num_classes = num_classes
        self.select_box_nums_for_evaluation = select_box_nums_for_evaluation
        self.use_focal = use_focal
        self.input_format = input_format
        backbone_div = getattr(backbone, "size_divisibility", 0) or 0
        self.size_divisibility = max(int(size_divisibility), int(backbone_div))
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ------------------------------------------------------------- to implement
    def forward_features(self, images: ImageList, masks: Tensor, **kwargs) -> Dict:
        """``images.tensor [B,3,H,W]`` normalised, padded; ``masks [B,H,W]`` True on
        padding. Returns the ``outputs`` dict described in the module docstring."""
        raise NotImplementedError

    # ------------------------------------------- shared by the method subclasses
    def init_single_scale(
        self,
        *,
        position_embedding: nn.Module,
        transformer: nn.Module,
        num_queries: int,
        aux_loss: bool,
        in_feature: str,
    ) -> int:
        """Set-up shared by the single-scale detectors (DETR, Conditional DETR, DAB-DETR):
        checks ``in_feature`` and ``num_queries``, stores them with ``aux_loss``,
        ``position_embedding`` and ``transformer``, and creates the 1x1 ``input_proj`` from
        the backbone feature to ``transformer.d_model``, which it returns."""
        shapes = self.backbone.output_shape()
        if in_feature not in shapes:
            raise ValueError(f"backbone has no output {in_feature!r}; it gives {sorted(shapes)}")
        if num_queries < 1:
            raise ValueError(f"num_queries must be positive, got {num_queries}")
        d_model = transformer.d_model
        self.in_feature = in_feature
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self.position_embedding = position_embedding
        self.transformer = transformer
        self.input_proj = nn.Conv2d(shapes[in_feature].channels, d_model, kernel_size=1)
        return d_model

    def mask_and_position(self, feature: Tensor, masks: Tensor,
                          with_position: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        """``masks [B,H,W]`` (True on padding) resized to ``feature [B,C,h,w]`` and
        ``self.position_embedding`` of it in the feature's dtype: ``(mask [B,h,w], pos [B,d,h,w])``
        (``pos`` None without ``with_position``)."""
        mask = F.interpolate(masks[None].float(), size=feature.shape[-2:]).to(torch.bool)[0]
        if not with_position:
            return mask, None
        return mask, self.position_embedding(mask).to(feature.dtype)

    def single_scale_features(self, images: Union[ImageList, Tensor], masks: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Backbone ``in_feature`` -> ``(input_proj(feature), mask, pos)``, the transformer's
        inputs in the single-scale detectors (see :meth:`init_single_scale`)."""
        x = images.tensor if isinstance(images, ImageList) else images
        feat = self.backbone(x)[self.in_feature]
        mask, pos = self.mask_and_position(feat, masks)
        return self.input_proj(feat), mask, pos

    def aux_outputs(self, outputs_class: Sequence[Tensor], outputs_coord: Sequence[Tensor]) -> List[Dict[str, Tensor]]:
        """:func:`aux_outputs_list` when ``self.aux_loss``, else ``[]``."""
        return aux_outputs_list(outputs_class, outputs_coord) if self.aux_loss else []

    # ------------------------------------------------------------------ input
    def normalize(self, image: Tensor) -> Tensor:
        """One ``[3,H,W]`` image in ``input_format`` order, 0-255 -> normalised RGB float."""
        image = image.to(self.device, non_blocking=True).float()
        if image.shape[0] != 3:
            raise ValueError(
                f"expected a 3-channel image, got shape {tuple(image.shape)}; "
                "convert grayscale/RGBA in the dataset mapper"
            )
        if self.input_format == "BGR":
            image = image.flip(0)
        return (image - self.pixel_mean) / self.pixel_std

    def preprocess_image(self, batched_inputs: List[Dict]) -> Tuple[ImageList, Tensor]:
        """Normalises, pads (with 0 after normalisation, as DETR) and returns
        ``(ImageList, masks[B,H,W] bool, True on padding)``; ``image_sizes`` are unpadded."""
        images = [self.normalize(x["image"]) for x in batched_inputs]
        images = ImageList.from_tensors(images, self.size_divisibility)
        B, _, H, W = images.tensor.shape
        masks = torch.ones((B, H, W), dtype=torch.bool, device=self.device)
        for i, (h, w) in enumerate(images.image_sizes):
            masks[i, :h, :w] = False
        return images, masks

    def prepare_targets(self, instances: List[Instances]) -> List[Dict[str, Tensor]]:
        """``gt_instances`` -> ``[{"labels": [n] int64, "boxes": [n,4] cxcywh in [0,1]}]``,
        normalised by each image's unpadded (transformed) size."""
        targets = []
        for inst in instances:
            h, w = inst.image_size
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            boxes = inst.gt_boxes.tensor.to(self.device).float() / scale
            targets.append(
                {
                    "labels": inst.gt_classes.to(self.device, torch.long),
                    "boxes": box_xyxy_to_cxcywh(boxes),
                }
            )
        return targets

    # ---------------------------------------------------------------- forward
    def forward(self, batched_inputs: List[Dict]):
        images, masks = self.preprocess_image(batched_inputs)
        targets = None
        if self.training:
            if any("instances" not in x for x in batched_inputs):
                raise ValueError("training inputs need 'instances' (use DetrDatasetMapper(is_train=True))")
            targets = self.prepare_targets([x["instances"] for x in batched_inputs])
        if self.forward_features_needs_targets:
            outputs = self.forward_features(images, masks, targets=targets)
        else:
            outputs = self.forward_features(images, masks)
        if self.training:
            return self.compute_losses(outputs, targets)
        results = self.inference(outputs, images.image_sizes)
        processed = []
        for res, inp, size in zip(results, batched_inputs, images.image_sizes):
            h = inp.get("height", size[0])
            w = inp.get("width", size[1])
            processed.append({"instances": detector_postprocess(res, h, w)})
        return processed

    def compute_losses(self, outputs: Dict, targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        if self.criterion is None:
            raise RuntimeError(f"{type(self).__name__} was built without a criterion: cannot train")
        return self.criterion(outputs, targets)

    # -------------------------------------------------------------- inference
    def select_detections(self, logits: Tensor, boxes: Tensor,
                          num: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """``logits [B,Q,C]``, ``boxes [B,Q,4]`` -> ``(scores, labels, boxes)`` each ``[B,K,...]``,
        the top ``K = num`` (default ``select_box_nums_for_evaluation``; fewer if there are fewer)."""
        B, Q, C = logits.shape
        num = self.select_box_nums_for_evaluation if num is None else num
        if self.use_focal:
            prob = logits.sigmoid().flatten(1)
            k = num_selected(num, prob, 1)
            scores, idx = prob.topk(k, dim=1)
            query = torch.div(idx, C, rounding_mode="floor")
            labels = idx % C
        else:
            scores, labels = logits.softmax(-1)[..., :-1].max(-1)
            k = min(num, Q)
            query = torch.arange(Q, device=logits.device).expand(B, Q)
            if k < Q:
                scores, order = scores.topk(k, dim=1)
                labels = labels.gather(1, order)
                query = query.gather(1, order)
        boxes = boxes.gather(1, query.unsqueeze(-1).expand(-1, -1, 4))
        return scores, labels, boxes

    def inference(self, outputs: Dict, image_sizes: List[Tuple[int, int]]) -> List[Instances]:
        """Top detections per image as ``Instances`` in the (resized, unpadded) input's
        pixel coordinates; :meth:`forward` then rescales them to ``height``/``width``."""
        use_nms = self.test_nms_thresh is not None
        scores, labels, boxes = self.select_detections(
            outputs["pred_logits"].float(), outputs["pred_boxes"].float(),
            self.test_topk_candidates if use_nms else None,
        )
        results = []
        for s, l, b, (h, w) in zip(scores, labels, boxes, image_sizes):
            scale = torch.tensor([w, h, w, h], dtype=b.dtype, device=b.device)
            res = Instances((h, w))
            res.pred_boxes = Boxes(box_cxcywh_to_xyxy(b) * scale)
            res.scores = s
            res.pred_classes = l
            if use_nms:
                keep = batched_nms(res.pred_boxes.tensor, s, l, self.test_nms_thresh)  # by decreasing score
                res = res[keep[: self.select_box_nums_for_evaluation]]
            results.append(res)
        return results
