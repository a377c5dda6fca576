"""DINO's transformer (Zhang et al., ICLR 2023): the two-stage deformable transformer with *mixed
query selection*, shared by DINO and Focus-DETR.

Following the official code (IDEA-Research/DINO, ``models/dino/deformable_transformer.py`` with
``two_stage_type="standard"``, ``embed_init_tgt=True``):

* every encoder token gets a detection from the proposal heads (``enc_output`` + LayerNorm, then
  the transformer's own ``enc_out_class_embed`` / ``enc_out_bbox_embed``, which the detector sets);
* the top ``two_stage_num_proposals`` (900) tokens by their *largest* class logit are selected;
  their refined boxes, detached, are the decoder's initial anchors (the positional part);
* the content queries are learned (``tgt_embed``), not taken from the encoder;
* the encoder loss is computed on the selected tokens only, with their real classes (the
  criterion's ``enc_class_agnostic=False``), through the undetached boxes.

An image with fewer tokens than ``two_stage_num_proposals`` selects all of them (and uses the
first rows of ``tgt_embed``) instead of failing as the official ``topk`` does.
"""
from typing import List, Tuple

import torch
from torch import Tensor, nn

from d2detr.layers.dynamic_shapes import num_selected

from .deformable_transformer import DeformableDetrTransformer, gather_tokens

__all__ = ["DinoTransformer"]


class DinoTransformer(DeformableDetrTransformer):
    """Args: as :class:`~d2detr.modeling.deformable_transformer.DeformableDetrTransformer`; always
    two-stage, and the decoder must derive its positional queries from the anchors
    (:class:`~d2detr.modeling.deformable_transformer.AnchorDeformableDecoder`)."""

    queries_from_proposal_embedding = False

    def __init__(self, encoder: nn.Module, decoder: nn.Module, embed_dim: int = 256, num_feature_levels: int = 4,
                 two_stage: bool = True, two_stage_num_proposals: int = 900):
        if not two_stage:
            raise ValueError("DINO's query selection is two-stage (two_stage=True)")
        if not getattr(decoder, "derives_query_pos", False):
            raise TypeError("DinoTransformer needs a decoder that derives positions from anchors "
                            f"(AnchorDeformableDecoder), got {type(decoder).__name__}")
        super().__init__(encoder, decoder, embed_dim, num_feature_levels, True, two_stage_num_proposals)
        self.tgt_embed = nn.Embedding(two_stage_num_proposals, embed_dim)
        # the official transformer creates it before its Xavier pass over every matrix
        nn.init.xavier_uniform_(self.tgt_embed.weight)

    def select_queries(self, memory: Tensor, mask_flatten: Tensor, spatial_shapes_list: List[Tuple[int, int]],
                       query_embed=None):
        _, enc_logits, enc_coords_unact = self.encoder_proposals(memory, mask_flatten, spatial_shapes_list)
        k = num_selected(self.two_stage_num_proposals, enc_logits, 1)
        topk = torch.topk(enc_logits.max(-1)[0], k, dim=1)[1]
        coords_unact = gather_tokens(enc_coords_unact, topk)
        tgt = self.tgt_embed.weight[:k].unsqueeze(0).expand(memory.shape[0], -1, -1)
        return tgt, None, coords_unact.detach().sigmoid(), gather_tokens(enc_logits, topk), coords_unact
