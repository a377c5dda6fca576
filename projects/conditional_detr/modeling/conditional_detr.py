"""Conditional DETR for Fast Training Convergence (Meng et al., ICCV 2021).

Backbone (res5, or dilated res5 for DC5) -> 1x1 input projection -> sine positions -> DETR's
post-norm encoder -> the conditional decoder of
:mod:`d2detr.modeling.conditional_transformer` over ``num_queries`` (300) learned query
embeddings. Each query predicts a 2-D reference point ``s``; every decoder layer's box is
``sigmoid(bbox_embed(f) + [inverse_sigmoid(s), 0, 0])`` and its classes come from a sigmoid
(focal-loss) head over ``num_classes`` without a no-object logit; inference keeps the top
100 of queries x classes. Detectron2 I/O, losses and inference live in
:class:`~d2detr.modeling.meta_arch.DETRBase`.

Parameter names follow the official implementation (``input_proj``, ``query_embed``,
``class_embed``, ``bbox_embed``, ``transformer.*``).
"""
from typing import Dict, Optional, Sequence, Union

import torch
from detectron2.structures import ImageList
from torch import Tensor, nn

from d2detr.layers import MLP, inverse_sigmoid
from d2detr.modeling.meta_arch import DETRBase
from d2detr.modeling.meta_arch.detr_base import init_focal_heads

__all__ = ["ConditionalDETR"]


class ConditionalDETR(DETRBase):
    """
    Args:
        backbone: a Detectron2 ``Backbone`` with output ``in_feature`` (ResNet res5).
        position_embedding: ``mask[B,H,W] -> pos[B,d_model,H,W]`` (``PositionEmbeddingSine``,
            offset 0 as DETR).
        transformer: a :class:`~d2detr.modeling.conditional_transformer.ConditionalDetrTransformer`
            (anything with ``d_model`` and its ``forward``).
        num_classes: object classes (sigmoid classification, no "no-object" logit).
        num_queries: object queries (300 in the paper).
        aux_loss: also return every intermediate decoder layer's predictions.
        criterion: the ``SetCriterion`` with focal loss (None for inference only).
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
        self.query_embed = nn.Embedding(num_queries, d_model)
        self.class_embed = nn.Linear(d_model, num_classes)
        self.bbox_embed = MLP(d_model, d_model, 4, 3)
        init_focal_heads(self.class_embed, self.bbox_embed, prior_prob)

    def forward_features(self, images: Union[ImageList, Tensor], masks: Tensor) -> Dict:
        """``images`` normalised ``[B,3,H,W]`` (or their ``ImageList``), ``masks [B,H,W]`` True
        on padding -> ``{"pred_logits" [B,Q,C], "pred_boxes" [B,Q,4] (cxcywh in [0,1] of the
        unpadded image), "reference_points" [B,Q,2], "aux_outputs": [...]}``."""
        src, mask, pos = self.single_scale_features(images, masks)
        hs, reference, _ = self.transformer(src, mask, self.query_embed.weight, pos)
        outputs_class = self.class_embed(hs)
        delta = self.bbox_embed(hs)
        ref = inverse_sigmoid(reference)
        outputs_coord = torch.cat([delta[..., :2] + ref, delta[..., 2:]], dim=-1).sigmoid()
        return {
            "pred_logits": outputs_class[-1],
            "pred_boxes": outputs_coord[-1],
            "reference_points": reference,
            "aux_outputs": self.aux_outputs(outputs_class, outputs_coord),
        }
