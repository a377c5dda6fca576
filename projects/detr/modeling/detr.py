"""DETR: End-to-End Object Detection with Transformers (Carion et al., 2020).

Backbone (res5) -> 1x1 input projection -> sine positions -> post-norm
encoder/decoder transformer over ``num_queries`` learned queries -> per-query
softmax class head (``num_classes + 1``, the last is no-object) and a 3-layer
box MLP with sigmoid. Every decoder layer's output goes through the heads for
the auxiliary losses. Detectron2 I/O, losses and inference live in
:class:`~d2detr.modeling.meta_arch.DETRBase`.

Parameter names follow the official implementation (``input_proj``,
``query_embed``, ``class_embed``, ``bbox_embed``, ``transformer.*``).
"""
from typing import Dict, Optional, Sequence, Union

from detectron2.structures import ImageList
from torch import Tensor, nn

from d2detr.layers import MLP
from d2detr.modeling.meta_arch import DETRBase

__all__ = ["DETR"]


class DETR(DETRBase):
    """
    Args:
        backbone: a Detectron2 ``Backbone`` with output ``in_feature`` (e.g. ResNet res5).
        position_embedding: ``mask[B,H,W] -> pos[B,d_model,H,W]`` (``PositionEmbeddingSine``).
        transformer: a :class:`~d2detr.modeling.transformer.DetrTransformer`
            (or anything with ``d_model`` and the same ``forward``).
        num_classes: object classes, without no-object.
        num_queries: object queries (detection slots).
        aux_loss: also return every intermediate decoder layer's predictions.
        criterion: the ``SetCriterion`` (None for inference only).
        in_feature: the backbone output fed to the transformer.
        The other keywords go to :class:`DETRBase`.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        position_embedding: nn.Module,
        transformer: nn.Module,
        num_classes: int,
        num_queries: int = 100,
        aux_loss: bool = True,
        criterion: nn.Module = None,
        in_feature: str = "res5",
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
            use_focal=False,
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
        self.query_embed = nn.Embedding(num_queries, d_model)
        self.class_embed = nn.Linear(d_model, num_classes + 1)
        self.bbox_embed = MLP(d_model, d_model, 4, 3)

    def forward_features(self, images: Union[ImageList, Tensor], masks: Tensor) -> Dict:
        """``images`` normalised ``[B,3,H,W]`` (or their ``ImageList``), ``masks [B,H,W]``
        True on padding -> ``{"pred_logits" [B,Q,C+1], "pred_boxes" [B,Q,4] (cxcywh in
        [0,1] of the unpadded image), "aux_outputs": [...] one dict per earlier decoder layer}``."""
        src, mask, pos = self.single_scale_features(images, masks)
        hs, _ = self.transformer(src, mask, self.query_embed.weight, pos)
        outputs_class = self.class_embed(hs)
        outputs_coord = self.bbox_embed(hs).sigmoid()
        return {
            "pred_logits": outputs_class[-1],
            "pred_boxes": outputs_coord[-1],
            "aux_outputs": self.aux_outputs(outputs_class, outputs_coord),
        }
