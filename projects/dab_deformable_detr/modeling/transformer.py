"""DAB-Deformable-DETR's transformer: Deformable DETR with 4-D anchor-box queries.

Reuses the deformable encoder/decoder of :mod:`d2detr.modeling.deformable_transformer` and
Deformable DETR's transformer (level embedding, two-stage proposals); what DAB adds, following
the official implementation (IDEA-Research/DAB-DETR, ``models/dab_deformable_detr``):

* queries are a learned content embedding ``tgt_embed`` plus a learned anchor box
  ``refpoint_embed`` (x, y, w, h), which is the reference box of the first decoder layer;
* every decoder layer derives its positional query from its current anchor:
  ``query_pos = MLP(PE(anchor)) * (1 if first layer else query_scale(f))`` (``ref_point_head``
  2D -> D on the sine embedding of the anchor scaled by the first level's valid ratios);
* anchors are refined layer by layer by the per-layer box heads (iterative box refinement).
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from d2detr.layers.mlp import MLP
from d2detr.modeling.conditional_transformer import gen_sineembed_for_position
from d2detr.modeling.deformable_transformer import (
    DeformableTransformerDecoder,
    flatten_multi_level,
    gen_encoder_output_proposals,
    get_proposal_pos_embed,
    reset_deformable_parameters,
)
from d2detr.projects.deformable_detr.modeling import DeformableDetrTransformer

__all__ = ["DabDeformableDecoder", "DabDeformableDetrTransformer"]


class DabDeformableDecoder(DeformableTransformerDecoder):
    """Deformable decoder whose positional queries come from the 4-D anchors.

    ``forward(tgt[N,Q,C], reference_points[N,Q,4] (sigmoid anchors), memory, spatial_shapes,
    level_start_index, valid_ratios, memory_padding_mask, self_attn_mask)`` returns
    ``(hs [L,N,Q,C], references [L,N,Q,4])``; ``references[i]`` are the anchors after layer ``i``
    (as :class:`DeformableTransformerDecoder`).
    """

    def __init__(self, decoder_layer: nn.Module, num_layers: int, embed_dim: int = 256,
                 return_intermediate: bool = True):
        super().__init__(decoder_layer, num_layers, return_intermediate)
        self.embed_dim = embed_dim
        self.query_scale = MLP(embed_dim, embed_dim, embed_dim, 2)
        self.ref_point_head = MLP(2 * embed_dim, embed_dim, embed_dim, 2)

    def forward(
        self,
        tgt: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        query_pos: Optional[Tensor] = None,
        memory_padding_mask: Optional[Tensor] = None,
        self_attn_mask: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        if query_pos is not None:
            raise ValueError("DAB-Deformable-DETR derives the positional queries from the anchors; pass query_pos=None")
        if reference_points.shape[-1] != 4:
            raise ValueError(f"anchors must be (x, y, w, h), got shape {tuple(reference_points.shape)}")
        output = tgt
        intermediate: List[Tensor] = []
        intermediate_reference_points: List[Tensor] = []
        for lid, layer in enumerate(self.layers):
            reference_points_input = self.scale_reference_points(reference_points, valid_ratios)
            sine = gen_sineembed_for_position(reference_points_input[:, :, 0, :], self.embed_dim // 2)
            query_pos = self.ref_point_head(sine)
            if lid != 0:
                query_pos = query_pos * self.query_scale(output)
            output = layer(output, query_pos, reference_points_input, memory, spatial_shapes,
                           level_start_index, memory_padding_mask, self_attn_mask)
            if self.bbox_embed is not None:
                reference_points = self.refine_reference_points(self.bbox_embed[lid](output), reference_points).detach()
            if self.return_intermediate:
                intermediate.append(output)
                intermediate_reference_points.append(reference_points)
        if self.return_intermediate:
            return torch.stack(intermediate), torch.stack(intermediate_reference_points)
        return output[None], reference_points[None]


class DabDeformableDetrTransformer(DeformableDetrTransformer):
    """Deformable DETR's transformer with a :class:`DabDeformableDecoder`.

    ``forward(srcs, masks, pos_embeds, query_embed)``: single-stage ``query_embed`` is
    ``(tgt_embed [Q, C], refpoint_embed [Q, 4] unsigmoided anchors)``; two-stage takes None and
    starts from the top-scoring encoder proposals (content queries from their position
    embedding, as Deformable DETR, anchors = the proposals). Returns what
    :class:`DeformableDetrTransformer` returns.
    """

    def __init__(self, encoder, decoder: DabDeformableDecoder, embed_dim: int = 256, num_feature_levels: int = 4,
                 two_stage: bool = False, two_stage_num_proposals: int = 300):
        if not isinstance(decoder, DabDeformableDecoder):
            raise TypeError(f"decoder must be a DabDeformableDecoder, got {type(decoder).__name__}")
        super().__init__(encoder, decoder, embed_dim, num_feature_levels, two_stage, two_stage_num_proposals)
        if not two_stage:
            del self.reference_points  # the anchors replace Deformable DETR's reference-point projection

    def reset_parameters(self):
        reset_deformable_parameters(self)
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: List[Tensor], masks: List[Tensor], pos_embeds: List[Tensor],
                query_embed: Optional[Tuple[Tensor, Tensor]] = None):
        if not self.two_stage and query_embed is None:
            raise ValueError("single-stage DAB-Deformable-DETR needs query_embed=(tgt_embed, refpoint_embed)")
        (src_flatten, mask_flatten, lvl_pos_embed_flatten, spatial_shapes, level_start_index, valid_ratios,
         spatial_shapes_list) = flatten_multi_level(srcs, masks, pos_embeds, self.level_embed)
        memory = self.encoder(src_flatten, spatial_shapes, level_start_index, valid_ratios,
                              pos=lvl_pos_embed_flatten, padding_mask=mask_flatten,
                              spatial_shapes_list=spatial_shapes_list)
        bs, _, c = memory.shape
        enc_outputs_class = enc_outputs_coord_unact = None
        if self.two_stage:
            output_memory, output_proposals = gen_encoder_output_proposals(memory, mask_flatten, spatial_shapes_list)
            output_memory = self.enc_output_norm(self.enc_output(output_memory))
            enc_outputs_class = self.decoder.class_embed[self.decoder.num_layers](output_memory)
            enc_outputs_coord_unact = self.decoder.bbox_embed[self.decoder.num_layers](output_memory) + output_proposals
            topk = min(self.two_stage_num_proposals, enc_outputs_class.shape[1])
            topk_proposals = torch.topk(enc_outputs_class[..., 0], topk, dim=1)[1]
            topk_coords_unact = torch.gather(
                enc_outputs_coord_unact, 1, topk_proposals.unsqueeze(-1).repeat(1, 1, 4)
            ).detach()
            reference_points = topk_coords_unact.sigmoid()
            pos_trans_out = self.pos_trans_norm(
                self.pos_trans(get_proposal_pos_embed(topk_coords_unact, c // 2).to(memory.dtype))
            )
            tgt = pos_trans_out[..., c:]  # content part; positions come from the anchors
        else:
            tgt_embed, refpoint_embed = query_embed
            tgt = tgt_embed.unsqueeze(0).expand(bs, -1, -1)
            reference_points = refpoint_embed.sigmoid().unsqueeze(0).expand(bs, -1, -1)
        init_reference_out = reference_points
        hs, inter_references = self.decoder(tgt, reference_points, memory, spatial_shapes, level_start_index,
                                            valid_ratios, query_pos=None, memory_padding_mask=mask_flatten)
        return hs, init_reference_out, inter_references, enc_outputs_class, enc_outputs_coord_unact
