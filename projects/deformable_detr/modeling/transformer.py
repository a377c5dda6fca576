"""The Deformable DETR transformer: encoder + decoder stacks (shared, in
``d2detr.modeling.deformable_transformer``) plus what only Deformable DETR has -- the level
embedding, the learned 2-d reference points of single-stage queries, and the two-stage
query selection from encoder proposals."""
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from d2detr.modeling.deformable_transformer import (
    DeformableTransformerDecoder,
    DeformableTransformerEncoder,
    flatten_multi_level,
    gen_encoder_output_proposals,
    get_proposal_pos_embed,
    reset_deformable_parameters,
)

__all__ = ["DeformableDetrTransformer"]


class DeformableDetrTransformer(nn.Module):
    """Encoder-decoder of Deformable DETR.

    Args:
        encoder, decoder: the shared stacks.
        embed_dim: model width (256).
        num_feature_levels: number of input levels (4; 1 for single-scale).
        two_stage: take the decoder queries from the top-scoring encoder proposals; needs
            ``decoder.class_embed`` / ``decoder.bbox_embed`` with one extra head (index
            ``decoder.num_layers``) for the proposals, which the detector sets.
        two_stage_num_proposals: how many proposals become queries (300).
    """

    def __init__(
        self,
        encoder: DeformableTransformerEncoder,
        decoder: DeformableTransformerDecoder,
        embed_dim: int = 256,
        num_feature_levels: int = 4,
        two_stage: bool = False,
        two_stage_num_proposals: int = 300,
    ):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.embed_dim = embed_dim
        self.num_feature_levels = num_feature_levels
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals

        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, embed_dim))
        if two_stage:
            self.enc_output = nn.Linear(embed_dim, embed_dim)
            self.enc_output_norm = nn.LayerNorm(embed_dim)
            self.pos_trans = nn.Linear(embed_dim * 2, embed_dim * 2)
            self.pos_trans_norm = nn.LayerNorm(embed_dim * 2)
        else:
            self.reference_points = nn.Linear(embed_dim, 2)
        self.reset_parameters()

    def reset_parameters(self):
        """The official initialisation: Xavier for every matrix, then the deformable
        attention's own scheme, Xavier reference points and normal level embeddings."""
        reset_deformable_parameters(self)
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    def forward(
        self,
        srcs: List[Tensor],
        masks: List[Tensor],
        pos_embeds: List[Tensor],
        query_embed: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
        """
        Args:
            srcs, masks, pos_embeds: per level ``[N, C, H, W]``, ``[N, H, W]`` (True = padding),
                ``[N, C, H, W]``.
            query_embed: ``[num_queries, 2C]`` (query position, then content), single-stage only.

        Returns:
            hs ``[num_layers, N, Q, C]``; init_reference ``[N, Q, 2|4]``; inter_references
            ``[num_layers, N, Q, 2|4]``; and for two-stage the per-token encoder class logits
            ``[N, S, K]`` and box logits ``[N, S, 4]`` (else None).
        """
        assert self.two_stage or query_embed is not None
        (
            src_flatten,
            mask_flatten,
            lvl_pos_embed_flatten,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            spatial_shapes_list,
        ) = flatten_multi_level(srcs, masks, pos_embeds, self.level_embed)

        memory = self.encoder(
            src_flatten,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            pos=lvl_pos_embed_flatten,
            padding_mask=mask_flatten,
            spatial_shapes_list=spatial_shapes_list,
        )

        bs, _, c = memory.shape
        enc_outputs_class = enc_outputs_coord_unact = None
        if self.two_stage:
            output_memory, output_proposals = gen_encoder_output_proposals(
                memory, mask_flatten, spatial_shapes_list
            )
            output_memory = self.enc_output_norm(self.enc_output(output_memory))
            # a detection head on every token: the extra (num_layers-th) class and box heads
            enc_outputs_class = self.decoder.class_embed[self.decoder.num_layers](output_memory)
            enc_outputs_coord_unact = (
                self.decoder.bbox_embed[self.decoder.num_layers](output_memory) + output_proposals
            )
            topk = min(self.two_stage_num_proposals, enc_outputs_class.shape[1])
            # the official code ranks by the first class: the encoder loss makes it a
            # class-agnostic objectness score (every target is relabelled 0)
            topk_proposals = torch.topk(enc_outputs_class[..., 0], topk, dim=1)[1]
            topk_coords_unact = torch.gather(
                enc_outputs_coord_unact, 1, topk_proposals.unsqueeze(-1).repeat(1, 1, 4)
            ).detach()
            reference_points = topk_coords_unact.sigmoid()
            init_reference_out = reference_points
            pos_trans_out = self.pos_trans_norm(
                self.pos_trans(get_proposal_pos_embed(topk_coords_unact, c // 2).to(memory.dtype))
            )
            query_pos, tgt = torch.split(pos_trans_out, c, dim=2)
        else:
            query_pos, tgt = torch.split(query_embed, c, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(bs, -1, -1)
            tgt = tgt.unsqueeze(0).expand(bs, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()
            init_reference_out = reference_points

        hs, inter_references = self.decoder(
            tgt,
            reference_points,
            memory,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            query_pos=query_pos,
            memory_padding_mask=mask_flatten,
        )
        return hs, init_reference_out, inter_references, enc_outputs_class, enc_outputs_coord_unact
