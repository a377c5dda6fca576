"""Decoupled DETR: Spatially Disentangling Localization and Classification for Improved
End-to-End Object Detection (SD-DETR; Zhang, Song, Liu, Li, ICCV 2023).

Conditional DETR with a mini-detector: backbone (res5) -> 1x1 input projection -> sine
positions -> DETR's post-norm encoder -> the mini-detector's top-``num_queries`` anchor boxes ->
per task branch (classification / localisation) a query built from the anchor (task-aware:
from the branch's own discriminative points in the anchor's RoI) -> the spatially decoupled
conditional decoder (:mod:`.transformer`). The class head reads the classification branch,
the box head the localisation branch; every layer's box is
``sigmoid(bbox_embed(f_loc) + inverse_sigmoid(anchor))``. Heads are shared by the layers, as
Conditional DETR's. Losses: :class:`~.criterion.SDDETRCriterion` (focal, or the task-alignment
loss). Detectron2 I/O and inference live in :class:`~d2detr.modeling.meta_arch.DETRBase`.
"""
from typing import Dict, Optional, Sequence, Union

from detectron2.structures import ImageList
from torch import Tensor, nn

from d2detr.layers import MLP, inverse_sigmoid
from d2detr.modeling.meta_arch import DETRBase
from d2detr.modeling.meta_arch.detr_base import init_focal_heads

__all__ = ["SDDETR"]


class SDDETR(DETRBase):
    """
    Args:
        backbone: a Detectron2 ``Backbone`` with output ``in_feature`` (ResNet res5).
        position_embedding: ``mask[B,H,W] -> pos[B,d_model,H,W]`` (``PositionEmbeddingSine``,
            offset 0, as Conditional DETR).
        transformer: :class:`~.transformer.SDDetrTransformer` (its ``decoupling`` and
            ``task_aware_queries`` are two of the ablation flags).
        num_classes: object classes (sigmoid classification, no "no-object" logit).
        num_queries: anchors taken from the mini-detector (300); fewer when the feature map has
            fewer tokens.
        aux_loss: also return every intermediate decoder layer's predictions.
        criterion: :class:`~.criterion.SDDETRCriterion` (its ``alignment_loss`` is the third
            flag); None for inference only.
        in_feature: the backbone output fed to the transformer.
        prior_prob: initial foreground probability of the class head (focal-loss prior).
        The other keywords go to :class:`DETRBase`.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        position_embedding: nn.Module,
        transformer: nn.Module,
        num_classes: int,
        num_queries: int = 300,
        aux_loss: bool = True,
        criterion: nn.Module = None,
        in_feature: str = "res5",
        prior_prob: float = 0.01,
        pixel_mean: Sequence[float] = (123.675, 116.280, 103.530),
        pixel_std: Sequence[float] = (58.395, 57.120, 57.375),
        select_box_nums_for_evaluation: int = 100,
        size_divisibility: int = 0,
        input_format: str = "RGB",
        test_nms_thresh: Optional[float] = None,
        test_topk_candidates: Optional[int] = None,
    ):
        super().__init__(
            backbone=backbone,
            criterion=criterion,
            num_classes=num_classes,
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
            select_box_nums_for_evaluation=select_box_nums_for_evaluation,
            use_focal=True,
            size_divisibility=size_divisibility,
            input_format=input_format,
            test_nms_thresh=test_nms_thresh,
            test_topk_candidates=test_topk_candidates,
        )
        d_model = self.init_single_scale(
            position_embedding=position_embedding,
            transformer=transformer,
            num_queries=num_queries,
            aux_loss=aux_loss,
            in_feature=in_feature,
        )
        self.class_embed = nn.Linear(d_model, num_classes)
        self.bbox_embed = MLP(d_model, d_model, 4, 3)
        init_focal_heads(self.class_embed, self.bbox_embed, prior_prob)

    def forward_features(self, images: Union[ImageList, Tensor], masks: Tensor) -> Dict:
        """``images`` normalised ``[B,3,H,W]`` (or their ``ImageList``), ``masks [B,H,W]`` True on
        padding -> ``{"pred_logits" [B,Q,C], "pred_boxes" [B,Q,4] (cxcywh in [0,1] of the unpadded
        image), "aux_outputs": [...], "enc_outputs": the mini-detector's {"pred_logits" [B,HW,1],
        "pred_boxes" [B,HW,4]}, "anchors" [B,Q,4], "cls_reference_points" / "loc_reference_points"
        [B,Q,2]}`` and, with task-aware queries, ``"cls_points"`` / ``"loc_points"`` ``[B,Q,P,2]``."""
        src, mask, pos = self.single_scale_features(images, masks)
        t = self.transformer(src, mask, pos, self.num_queries)
        outputs_class = self.class_embed(t["hs_cls"])
        outputs_coord = (self.bbox_embed(t["hs_loc"]) + inverse_sigmoid(t["anchors"])).sigmoid()
        out = {
            "pred_logits": outputs_class[-1],
            "pred_boxes": outputs_coord[-1],
            "aux_outputs": self.aux_outputs(outputs_class, outputs_coord),
            "enc_outputs": {"pred_logits": t["enc_logits"], "pred_boxes": t["enc_boxes"]},
            "anchors": t["anchors"],
            "cls_reference_points": t["cls_reference"],
            "loc_reference_points": t["loc_reference"],
        }
        for b in ("cls", "loc"):
            if f"{b}_points" in t:
                out[f"{b}_points"] = t[f"{b}_points"]
        return out
