"""DAB-Deformable-DETR (Liu et al., ICLR 2022): Deformable DETR whose queries are learned
content embeddings plus learned 4-D anchor boxes (see :mod:`.transformer`).

Everything else -- backbone, neck, per-layer heads with iterative box refinement, two-stage
proposal heads, losses and inference -- is :class:`DeformableDETR`'s.
"""
from typing import Dict

import torch
from detectron2.structures import ImageList
from torch import Tensor, nn

from d2detr.layers.box_ops import inverse_sigmoid
from d2detr.projects.deformable_detr.modeling import DeformableDETR

from .transformer import DabDeformableDetrTransformer

__all__ = ["DABDeformableDETR"]


class DABDeformableDETR(DeformableDETR):
    """
    Args:
        transformer: a :class:`DabDeformableDetrTransformer`.
        random_refpoints_xy: initialise the anchor centres uniformly in [0, 1] (still learned).
        with_box_refine: refine the anchors layer by layer (the paper's dynamic anchors; True).
        Other arguments: see :class:`DeformableDETR`.
    """

    def __init__(self, *, transformer: DabDeformableDetrTransformer, num_queries: int = 300,
                 embed_dim: int = 256, random_refpoints_xy: bool = False, with_box_refine: bool = True, **kwargs):
        if not isinstance(transformer, DabDeformableDetrTransformer):
            raise TypeError(f"transformer must be a DabDeformableDetrTransformer, got {type(transformer).__name__}")
        super().__init__(transformer=transformer, num_queries=num_queries, embed_dim=embed_dim,
                         with_box_refine=with_box_refine, **kwargs)
        self.random_refpoints_xy = random_refpoints_xy
        if not self.two_stage:
            del self.query_embed
            self.tgt_embed = nn.Embedding(num_queries, embed_dim)
            self.refpoint_embed = nn.Embedding(num_queries, 4)
            if random_refpoints_xy:
                with torch.no_grad():
                    self.refpoint_embed.weight[:, :2].uniform_(0, 1)
                    self.refpoint_embed.weight[:, :2] = inverse_sigmoid(self.refpoint_embed.weight[:, :2])

    def forward_features(self, images: ImageList, masks: Tensor) -> Dict:
        srcs, level_masks, pos_embeds = self.multi_scale_features(images, masks)
        query = None if self.two_stage else (self.tgt_embed.weight, self.refpoint_embed.weight)
        hs, init_reference, inter_references, enc_class, enc_coord_unact = self.transformer(
            srcs, level_masks, pos_embeds, query
        )
        outputs_classes, outputs_coords = [], []
        for lvl in range(hs.shape[0]):
            reference = init_reference if lvl == 0 else inter_references[lvl - 1]
            outputs_classes.append(self.class_embed[lvl](hs[lvl]))
            outputs_coords.append((self.bbox_embed[lvl](hs[lvl]) + inverse_sigmoid(reference)).sigmoid())
        out = {"pred_logits": outputs_classes[-1], "pred_boxes": outputs_coords[-1],
               "anchors": torch.cat([init_reference[None], inter_references[:-1]])}
        return self.add_training_outputs(out, outputs_classes, outputs_coords, enc_class, enc_coord_unact)
