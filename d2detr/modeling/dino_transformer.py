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

In training the selection also hands the detector every token's proposal
(``enc_dense_outputs``), which :class:`~d2detr.modeling.criterion.SetCriterion` supervises
one-to-many when ``enc_one2many_repeat > 0`` (not part of DINO; off in its configs).

``num_one2many_queries > 0`` adds H-DETR's hybrid branch in training
(:mod:`d2detr.modeling.hybrid_matching`): the next ``num_one2many_queries`` proposals after the
top ``two_stage_num_proposals`` become one-to-many queries with learned content of their own
(``tgt_embed_one2many``), kept apart from the others in self-attention. Inference selects only
the top ``two_stage_num_proposals``, as without it.
"""
from typing import List, Tuple

import torch
from torch import Tensor, nn

from d2detr.layers.dynamic_shapes import num_selected

from .deformable_transformer import DeformableDetrTransformer, gather_tokens
from .hybrid_matching import hybrid_attn_mask

__all__ = ["DinoTransformer"]


class DinoTransformer(DeformableDetrTransformer):
    """Args: as :class:`~d2detr.modeling.deformable_transformer.DeformableDetrTransformer`; always
    two-stage, and the decoder must derive its positional queries from the anchors
    (:class:`~d2detr.modeling.deformable_transformer.AnchorDeformableDecoder`).
    ``num_one2many_queries``: H-DETR's one-to-many queries in training (0: none, DINO).
    ``num_decoder_only_levels``: see the base class (0: DINO)."""

    queries_from_proposal_embedding = False

    def __init__(self, encoder: nn.Module, decoder: nn.Module, embed_dim: int = 256, num_feature_levels: int = 4,
                 two_stage: bool = True, two_stage_num_proposals: int = 900, num_one2many_queries: int = 0,
                 num_decoder_only_levels: int = 0):
        if not two_stage:
            raise ValueError("DINO's query selection is two-stage (two_stage=True)")
        if not getattr(decoder, "derives_query_pos", False):
            raise TypeError("DinoTransformer needs a decoder that derives positions from anchors "
                            f"(AnchorDeformableDecoder), got {type(decoder).__name__}")
        super().__init__(encoder, decoder, embed_dim, num_feature_levels, True, two_stage_num_proposals,
                         num_decoder_only_levels)
        self.tgt_embed = nn.Embedding(two_stage_num_proposals, embed_dim)
        # the official transformer creates it before its Xavier pass over every matrix
        nn.init.xavier_uniform_(self.tgt_embed.weight)
        if num_one2many_queries < 0:
            raise ValueError(f"num_one2many_queries must be >= 0, got {num_one2many_queries}")
        self.num_one2many_queries = num_one2many_queries
        if num_one2many_queries:
            self.tgt_embed_one2many = nn.Embedding(num_one2many_queries, embed_dim)
            nn.init.xavier_uniform_(self.tgt_embed_one2many.weight)

    def training_one2many(self) -> int:
        """How many one-to-many queries this forward pass asks for (0 at inference)."""
        return self.num_one2many_queries if self.training else 0

    def matching_attn_mask(self, num_matching: int, num_denoising: int, denoising_mask, device):
        """The denoising mask, plus the hybrid branch's blocks in training (``num_matching`` =
        the one-to-one then the one-to-many queries, as :meth:`select_queries` returned them)."""
        if not self.training_one2many():
            return denoising_mask
        num_one2one = min(self.two_stage_num_proposals, num_matching)
        return hybrid_attn_mask(num_one2one, num_matching - num_one2one, num_denoising, denoising_mask, device)

    def select_queries(self, memory: Tensor, mask_flatten: Tensor, spatial_shapes_list: List[Tuple[int, int]],
                       query_embed=None):
        _, enc_logits, enc_coords_unact = self.encoder_proposals(memory, mask_flatten, spatial_shapes_list)
        one2many = self.training_one2many()
        k = num_selected(self.two_stage_num_proposals + one2many, enc_logits, 1)
        topk = torch.topk(enc_logits.max(-1)[0], k, dim=1)[1]  # sorted: the one-to-one queries first
        coords_unact = gather_tokens(enc_coords_unact, topk)
        tgt = self.tgt_embed.weight[:k]
        if one2many:  # training only: k is a Python int here
            num_one2one = min(self.two_stage_num_proposals, k)
            tgt = torch.cat([tgt, self.tgt_embed_one2many.weight[: k - num_one2one]])
            # the encoder loss stays on the one-to-one selection, as without the hybrid branch
            topk = topk[:, :num_one2one]
        tgt = tgt.unsqueeze(0).expand(memory.shape[0], -1, -1)
        selected_coords_unact = coords_unact[:, : topk.shape[1]]
        selection = (tgt, None, coords_unact.detach().sigmoid(), gather_tokens(enc_logits, topk), selected_coords_unact)
        if self.training:
            # every token's proposal, for a one-to-many encoder loss (SetCriterion's
            # enc_one2many_repeat); the criterion ignores it otherwise
            dense = {"pred_logits": enc_logits, "pred_boxes": enc_coords_unact.sigmoid()}
            return selection + ({"enc_dense_outputs": dense},)
        return selection
