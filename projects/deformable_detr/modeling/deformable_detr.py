"""Deformable DETR (Zhu et al., ICLR 2021) as a Detectron2 meta-architecture.

Single-scale, multi-scale, + iterative bounding box refinement, + two-stage, following the
official implementation (fundamentalvision/Deformable-DETR, ``models/deformable_detr.py``).
"""
import copy
from typing import Dict, List, Optional, Tuple, Union

import torch
from detectron2.structures import ImageList
from torch import Tensor, nn

from d2detr.layers.box_ops import inverse_sigmoid
from d2detr.layers.mlp import MLP
from d2detr.modeling.meta_arch.detr_base import DETRBase, aux_outputs_list, init_focal_heads

from .transformer import DeformableDetrTransformer

__all__ = ["DeformableDETR"]


class DeformableDETR(DETRBase):
    """
    Args:
        backbone: a Detectron2 ``Backbone`` (ResNet-50 res3-res5 in the paper).
        neck: :class:`~d2detr.modeling.neck.ChannelMapper` producing
            ``transformer.num_feature_levels`` maps of ``embed_dim`` channels.
        position_embedding: ``PositionEmbeddingSine(normalize=True, offset=-0.5)``, applied
            to every level's padding mask.
        transformer: :class:`DeformableDetrTransformer`; its ``two_stage`` flag makes this a
            two-stage model.
        criterion: ``SetCriterion`` with focal classification (None for inference only).
        num_classes: object classes (sigmoid, no "no-object" logit).
        num_queries: decoder queries (300); two-stage takes this many proposals.
        embed_dim: transformer width (256).
        aux_loss: supervise every decoder layer.
        with_box_refine: one box/class head per decoder layer (deep copies), each layer refining
            the previous layer's boxes. Two-stage requires it (as in the official code).
        select_box_nums_for_evaluation: detections per image at inference (top-k over
            queries x classes).
        others: see :class:`~d2detr.modeling.meta_arch.detr_base.DETRBase`.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: nn.Module,
        position_embedding: nn.Module,
        transformer: DeformableDetrTransformer,
        criterion: nn.Module = None,
        num_classes: int = 80,
        num_queries: int = 300,
        embed_dim: int = 256,
        aux_loss: bool = True,
        with_box_refine: bool = False,
        select_box_nums_for_evaluation: int = 100,
        pixel_mean=(123.675, 116.280, 103.530),
        pixel_std=(58.395, 57.120, 57.375),
        size_divisibility: int = 0,
        input_format: str = "RGB",
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
        )
        two_stage = transformer.two_stage
        if two_stage and not with_box_refine:
            raise ValueError("two-stage Deformable DETR needs with_box_refine=True (as the official code)")
        num_levels = getattr(neck, "num_outs", transformer.num_feature_levels)
        if num_levels != transformer.num_feature_levels:
            raise ValueError(
                f"the neck gives {num_levels} feature levels, the transformer expects {transformer.num_feature_levels}"
            )
        if two_stage and transformer.two_stage_num_proposals != num_queries:
            raise ValueError(
                f"two-stage: transformer.two_stage_num_proposals ({transformer.two_stage_num_proposals}) "
                f"must equal num_queries ({num_queries})"
            )
        self.neck = neck
        self.position_embedding = position_embedding
        self.transformer = transformer
        self.num_queries = num_queries
        self.embed_dim = embed_dim
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage

        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, embed_dim * 2)

        class_embed = nn.Linear(embed_dim, num_classes)
        bbox_embed = MLP(embed_dim, embed_dim, 4, 3)
        init_focal_heads(class_embed, bbox_embed, prior_prob=0.01)

        # the two-stage proposal heads are the extra (num_decoder_layers-th) ones
        num_pred = transformer.decoder.num_layers + (1 if two_stage else 0)
        if with_box_refine:
            self.class_embed = nn.ModuleList([copy.deepcopy(class_embed) for _ in range(num_pred)])
            self.bbox_embed = nn.ModuleList([copy.deepcopy(bbox_embed) for _ in range(num_pred)])
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
            self.transformer.decoder.bbox_embed = self.bbox_embed
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            # one head shared by all decoder layers
            self.class_embed = nn.ModuleList([class_embed for _ in range(num_pred)])
            self.bbox_embed = nn.ModuleList([bbox_embed for _ in range(num_pred)])
            self.transformer.decoder.bbox_embed = None
        if two_stage:
            self.transformer.decoder.class_embed = self.class_embed
            for box_embed in self.bbox_embed:
                nn.init.constant_(box_embed.layers[-1].bias[2:], 0.0)

    def multi_scale_features(
        self, images: Union[ImageList, Tensor], masks: Tensor
    ) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """Backbone -> neck -> ``(srcs, level_masks, pos_embeds)``, one of each per level."""
        x = images.tensor if isinstance(images, ImageList) else images
        srcs = self.neck(self.backbone(x))
        level_masks: List[Tensor] = []
        pos_embeds: List[Tensor] = []
        for src in srcs:
            mask, pos = self.mask_and_position(src, masks)
            level_masks.append(mask)
            pos_embeds.append(pos)
        return srcs, level_masks, pos_embeds

    def add_training_outputs(
        self, out: Dict, outputs_classes: List[Tensor], outputs_coords: List[Tensor],
        enc_class: Optional[Tensor], enc_coord_unact: Optional[Tensor],
    ) -> Dict:
        """In training, adds ``aux_outputs`` (with ``aux_loss``) and, two-stage, the encoder
        proposals as ``enc_outputs`` to ``out``; returns it."""
        if self.training and self.aux_loss:
            out["aux_outputs"] = aux_outputs_list(outputs_classes, outputs_coords)
        if self.training and self.two_stage:
            out["enc_outputs"] = {"pred_logits": enc_class, "pred_boxes": enc_coord_unact.sigmoid()}
        return out

    def forward_features(self, images: ImageList, masks: Tensor) -> Dict:
        srcs, level_masks, pos_embeds = self.multi_scale_features(images, masks)

        query_embed = None if self.two_stage else self.query_embed.weight
        hs, init_reference, inter_references, enc_class, enc_coord_unact = self.transformer(
            srcs, level_masks, pos_embeds, query_embed
        )

        outputs_classes = []
        outputs_coords = []
        for lvl in range(hs.shape[0]):
            reference = init_reference if lvl == 0 else inter_references[lvl - 1]
            reference = inverse_sigmoid(reference)
            outputs_class = self.class_embed[lvl](hs[lvl])
            tmp = self.bbox_embed[lvl](hs[lvl])
            if reference.shape[-1] == 4:
                tmp = tmp + reference
            else:
                tmp = torch.cat([tmp[..., :2] + reference, tmp[..., 2:]], -1)
            outputs_classes.append(outputs_class)
            outputs_coords.append(tmp.sigmoid())

        out = {"pred_logits": outputs_classes[-1], "pred_boxes": outputs_coords[-1]}
        return self.add_training_outputs(out, outputs_classes, outputs_coords, enc_class, enc_coord_unact)
