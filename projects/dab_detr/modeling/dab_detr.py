"""DAB-DETR: Dynamic Anchor Boxes are Better Queries for DETR (Liu et al., ICLR 2022).

Queries are learnable 4-D anchor boxes (``refpoint_embed``, unsigmoided (x, y, w, h)); the
decoder (:class:`~.transformer.DabDetrDecoder`) derives positional queries from them, modulates
cross-attention by their width and height and refines them layer by layer with the shared box
head. Every decoder layer predicts boxes relative to the anchors it used,
``sigmoid(bbox_embed(f) + inverse_sigmoid(anchor))``, and classes with a sigmoid (focal-loss)
head. Detectron2 I/O, losses and inference live in :class:`~d2detr.modeling.meta_arch.DETRBase`.

Parameter names follow the official implementation (``input_proj``, ``refpoint_embed``,
``class_embed``, ``bbox_embed`` -- also registered as ``transformer.decoder.bbox_embed``).
"""
from typing import Dict, Optional, Sequence, Union

import torch
from detectron2.structures import ImageList
from torch import Tensor, nn

from d2detr.layers import MLP, inverse_sigmoid
from d2detr.modeling.meta_arch import DETRBase
from d2detr.modeling.meta_arch.detr_base import init_focal_heads

__all__ = ["DABDETR"]


class DABDETR(DETRBase):
    """
    Args:
        backbone: a Detectron2 ``Backbone`` with output ``in_feature`` (ResNet res5).
        position_embedding: ``PositionEmbeddingSine`` with temperature 20 (DAB-DETR's
            temperature tuning of the key positional encodings).
        transformer: :class:`~.transformer.DabDetrTransformer` (its ``num_patterns`` multiplies
            the queries).
        num_classes: object classes (sigmoid classification, no "no-object" logit).
        num_queries: anchor boxes (300).
        aux_loss: also return every intermediate decoder layer's predictions.
        criterion: the ``SetCriterion`` with focal loss (None for inference only).
        random_refpoints_xy: initialise the anchors' centres uniformly in [0, 1] (the official
            ``--random_refpoints_xy``; as there, they are still learned).
        iter_update: refine the anchors layer by layer with ``bbox_embed`` (the paper's
            dynamic anchors); False keeps them fixed through the decoder.
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
        random_refpoints_xy: bool = False,
        iter_update: bool = True,
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
        self.refpoint_embed = nn.Embedding(num_queries, 4)
        self.random_refpoints_xy = random_refpoints_xy
        if random_refpoints_xy:
            with torch.no_grad():
                self.refpoint_embed.weight[:, :2].uniform_(0, 1)
                self.refpoint_embed.weight[:, :2] = inverse_sigmoid(self.refpoint_embed.weight[:, :2])
        self.class_embed = nn.Linear(d_model, num_classes)
        self.bbox_embed = MLP(d_model, d_model, 4, 3)
        init_focal_heads(self.class_embed, self.bbox_embed, prior_prob)
        if iter_update:
            self.transformer.decoder.bbox_embed = self.bbox_embed

    def forward_features(self, images: Union[ImageList, Tensor], masks: Tensor) -> Dict:
        """``images`` normalised ``[B,3,H,W]`` (or their ``ImageList``), ``masks [B,H,W]`` True
        on padding -> ``{"pred_logits" [B,Q',C], "pred_boxes" [B,Q',4] (cxcywh in [0,1] of the
        unpadded image), "anchors" [L,B,Q',4] (each layer's input anchors), "aux_outputs"}``
        with ``Q' = num_queries * max(num_patterns, 1)``."""
        src, mask, pos = self.single_scale_features(images, masks)
        hs, anchors, _ = self.transformer(src, mask, self.refpoint_embed.weight, pos)
        outputs_class = self.class_embed(hs)
        outputs_coord = (self.bbox_embed(hs) + inverse_sigmoid(anchors)).sigmoid()
        return {
            "pred_logits": outputs_class[-1],
            "pred_boxes": outputs_coord[-1],
            "anchors": anchors,
            "aux_outputs": self.aux_outputs(outputs_class, outputs_coord),
        }
