"""DAB-DETR's transformer: 4-D anchor boxes as decoder queries.

Follows the official implementation (IDEA-Research/DAB-DETR, ``models/DAB_DETR/transformer.py``)
and keeps its parameter names. Batch first.

* :class:`DabDetrEncoder` -- DETR's post-norm encoder layers whose position embedding is
  rescaled by ``query_scale(x)`` (an MLP of the layer input) before every layer.
* :class:`DabDetrDecoder` -- Conditional DETR's decoder layers
  (:class:`~d2detr.modeling.conditional_transformer.ConditionalDecoderLayer`) driven by anchors
  ``A_q = (x, y, w, h)``: the positional query is ``P_q = MLP(PE(A_q))`` (``ref_point_head``,
  2D -> D), the cross-attention spatial query ``PE(x, y) * query_scale(f)`` is modulated by
  ``w_ref / w`` and ``h_ref / h`` (``ref_anchor_head``: the width/height-modulated Gaussian
  kernel), and after every layer the anchors are refined by the shared box head
  (``bbox_embed``, set by the detector) -- gradients do not flow through the refined anchors.
* :class:`DabDetrTransformer` -- the two, plus the optional pattern embeddings (Anchor DETR's
  multiple patterns: every anchor is used with each of ``num_patterns`` content embeddings).
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from d2detr.layers.box_ops import inverse_sigmoid
from d2detr.layers.mlp import MLP
from d2detr.modeling.conditional_transformer import (
    ConditionalDecoderLayer,
    build_activation,
    gen_sineembed_for_position,
)
from d2detr.modeling.transformer import TransformerEncoderLayer, _clones, flatten_single_scale, xavier_init_

__all__ = ["DabDetrEncoder", "DabDetrDecoder", "DabDetrTransformer"]


def _encoder_layer(d_model, nhead, dim_feedforward, dropout, activation) -> TransformerEncoderLayer:
    """DETR's post-norm encoder layer, with DAB-DETR's PReLU available."""
    layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout,
                                    "relu" if activation == "prelu" else activation, False)
    if activation == "prelu":
        layer.activation = build_activation("prelu")
    return layer


class DabDetrEncoder(nn.Module):
    """``forward(src[B,N,C], pos[B,N,C], key_padding_mask[B,N])``; before layer ``i`` the
    positions are ``pos * query_scale(x_i)``."""

    def __init__(self, encoder_layer: nn.Module, num_layers: int, d_model: int = 256):
        super().__init__()
        self.layers = _clones(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.query_scale = MLP(d_model, d_model, d_model, 2)

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        output = src
        for layer in self.layers:
            output = layer(output, pos=pos * self.query_scale(output), key_padding_mask=key_padding_mask)
        return output


class DabDetrDecoder(nn.Module):
    """Decoder over anchor boxes.

    ``forward(tgt[B,Q,C], memory[B,N,C], pos[B,N,C], refpoints_unsigmoid[B,Q,4],
    memory_key_padding_mask)`` returns ``(hs[L,B,Q,C] (normalised), references[L,B,Q,4])``:
    ``references[i]`` are the (sigmoid) anchors layer ``i`` used, against which its boxes are
    predicted. ``bbox_embed`` (the detector's box head, shared) refines the anchors after each
    layer; without it the anchors stay fixed.
    """

    def __init__(
        self,
        decoder_layer: ConditionalDecoderLayer,
        num_layers: int,
        d_model: int = 256,
        query_dim: int = 4,
        modulate_hw_attn: bool = True,
        return_intermediate: bool = True,
    ):
        super().__init__()
        if query_dim != 4:
            raise ValueError(f"DAB-DETR anchors are (x, y, w, h): query_dim must be 4, got {query_dim}")
        self.layers = _clones(decoder_layer, num_layers)
        for layer in self.layers[1:]:
            if not layer.keep_query_pos:
                layer.ca_qpos_proj = None
        self.num_layers = num_layers
        self.d_model = d_model
        self.query_dim = query_dim
        self.norm = nn.LayerNorm(d_model)
        self.return_intermediate = return_intermediate
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_point_head = MLP(query_dim // 2 * d_model, d_model, d_model, 2)
        self.modulate_hw_attn = modulate_hw_attn
        self.ref_anchor_head = MLP(d_model, d_model, 2, 2) if modulate_hw_attn else None
        self.bbox_embed: Optional[nn.Module] = None

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        pos: Tensor,
        refpoints_unsigmoid: Tensor,
        memory_key_padding_mask: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        output = tgt
        reference = refpoints_unsigmoid.sigmoid()
        references: List[Tensor] = [reference]
        intermediate: List[Tensor] = []
        half = self.d_model // 2
        for i, layer in enumerate(self.layers):
            sine = gen_sineembed_for_position(reference, half)  # (y, x, w, h) x d/2
            query_pos = self.ref_point_head(sine)
            spatial = sine[..., : self.d_model]
            if i > 0:
                spatial = spatial * self.query_scale(output)
            if self.ref_anchor_head is not None:
                ref_hw = self.ref_anchor_head(output).sigmoid()  # (w_ref, h_ref)
                spatial = torch.cat([
                    spatial[..., :half] * (ref_hw[..., 1] / reference[..., 3]).unsqueeze(-1),  # y part: h
                    spatial[..., half:] * (ref_hw[..., 0] / reference[..., 2]).unsqueeze(-1),  # x part: w
                ], dim=-1)
            output = layer(output, memory, pos, query_pos, spatial,
                           memory_key_padding_mask=memory_key_padding_mask, is_first=i == 0)
            if self.bbox_embed is not None:
                new_reference = (self.bbox_embed(output)[..., : self.query_dim] + inverse_sigmoid(reference)).sigmoid()
                if i != self.num_layers - 1:
                    references.append(new_reference)
                reference = new_reference.detach()
            if self.return_intermediate:
                intermediate.append(self.norm(output))
        if not self.return_intermediate:
            return self.norm(output).unsqueeze(0), references[-1].unsqueeze(0)
        return torch.stack(intermediate), torch.stack(references)


class DabDetrTransformer(nn.Module):
    """DAB-DETR's encoder and decoder.

    ``forward(src[B,C,H,W], mask[B,H,W] (True = padding), refpoint_embed[Q,4] (unsigmoided
    anchors), pos_embed[B,C,H,W])`` returns ``(hs[L,B,Q',C], references[L,B,Q',4],
    memory[B,C,H,W])`` with ``Q' = Q * max(num_patterns, 1)``: with patterns, the content
    queries are the pattern embeddings (pattern-major: all anchors with pattern 0 first), else
    zeros.
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        activation: str = "prelu",
        num_patterns: int = 0,
        keep_query_pos: bool = False,
        modulate_hw_attn: bool = True,
        return_intermediate_dec: bool = True,
    ):
        super().__init__()
        if num_patterns < 0:
            raise ValueError(f"num_patterns must be >= 0, got {num_patterns}")
        self.encoder = DabDetrEncoder(
            _encoder_layer(d_model, nhead, dim_feedforward, dropout, activation), num_encoder_layers, d_model
        )
        self.decoder = DabDetrDecoder(
            ConditionalDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation, keep_query_pos),
            num_decoder_layers,
            d_model,
            modulate_hw_attn=modulate_hw_attn,
            return_intermediate=return_intermediate_dec,
        )
        self.d_model = d_model
        self.nhead = nhead
        self.num_patterns = num_patterns
        self.patterns = nn.Embedding(num_patterns, d_model) if num_patterns > 0 else None
        self._reset_parameters()

    def _reset_parameters(self):
        xavier_init_(self)

    def forward(self, src: Tensor, mask: Tensor, refpoint_embed: Tensor, pos_embed: Tensor):
        bs, c, h, w = src.shape
        src, pos, mask = flatten_single_scale(src, mask, pos_embed)
        memory = self.encoder(src, pos=pos, key_padding_mask=mask)
        refpoints = refpoint_embed.unsqueeze(0).expand(bs, -1, -1)
        num_queries = refpoints.shape[1]
        if self.patterns is None:
            tgt = refpoints.new_zeros(bs, num_queries, self.d_model)
        else:
            tgt = self.patterns.weight.repeat_interleave(num_queries, dim=0).unsqueeze(0).expand(bs, -1, -1)
            refpoints = refpoints.repeat(1, self.num_patterns, 1)
        hs, references = self.decoder(tgt, memory, pos, refpoints, memory_key_padding_mask=mask)
        return hs, references, memory.transpose(1, 2).reshape(bs, c, h, w)
