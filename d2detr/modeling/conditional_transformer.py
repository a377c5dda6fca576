"""Conditional cross-attention: the decoder of Conditional DETR, shared by its descendants
(DAB-DETR, SD-DETR).

Conditional DETR (Meng et al., ICCV 2021) splits each decoder query into a *content* part
(the decoder embedding ``f``) and a *spatial* part. The spatial query of a layer is
``p_q = λ_q ⊙ PE(s)``: ``s`` a 2-D reference point (x, y) predicted from the learnable
query embedding (``ref_point_head``, MLP + sigmoid), ``PE`` the sine embedding DETR uses for
image positions, and ``λ_q = FFN(f)`` (``query_scale``; the identity in the first layer).
In cross-attention, content and spatial parts are *concatenated* per head instead of added:
``q = [c_q ; p_q]``, ``k = [c_k ; p_k]``, so each head's dot product is the sum of a content
and a spatial similarity and the query/key head dimension is twice the value's.

Names follow the official implementation (Atten4Vis/ConditionalDETR, ``models/transformer.py``):
``sa_qcontent_proj``, ``sa_qpos_proj`` ... ``ca_qpos_sine_proj``, ``self_attn``/``cross_attn``
(attention without input projection, only ``out_proj``), ``linear1``/``linear2``,
``norm1..3``, decoder ``query_scale``, ``ref_point_head``, ``norm``. Tensors are batch first.

* :func:`gen_sineembed_for_position` -- sine embedding of (x, y) or (x, y, w, h) points.
* :class:`ConditionalAttention` -- multi-head attention over pre-projected q/k/v whose q/k
  width may differ from v's; returns the head-averaged attention map (for visualisation).
* :class:`ConditionalDecoderLayer` -- self-attention with separate content/position
  projections, conditional cross-attention, FFN; post-norm. Either half can be built and run
  alone (SD-DETR's shared self-attention and per-task cross-attention branches).
* :class:`ConditionalDetrDecoder` / :class:`ConditionalDetrTransformer` -- Conditional DETR's
  decoder and the DETR encoder + that decoder.
"""
import math
from contextlib import contextmanager
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2detr.layers.mlp import MLP
from d2detr.layers.precision import geometry_forward
from d2detr.modeling.transformer import (
    TransformerEncoder,
    TransformerEncoderLayer,
    _clones,
    flatten_single_scale,
    get_activation_fn,
    xavier_init_,
)

__all__ = [
    "gen_sineembed_for_position",
    "build_activation",
    "ConditionalAttention",
    "ConditionalDecoderLayer",
    "ConditionalDetrDecoder",
    "ConditionalDetrTransformer",
    "record_cross_attention",
]


def gen_sineembed_for_position(pos: Tensor, num_pos_feats: int = 128, temperature: float = 10000) -> Tensor:
    """``pos[..., n]`` normalised (x, y) or (x, y, w, h) -> ``[..., n * num_pos_feats]``.

    Every coordinate ``c`` becomes ``2π·c / temperature^(2⌊i/2⌋/num_pos_feats)``, sin on even
    and cos on odd ``i`` (interleaved, as DETR's image embedding). The output order is
    (y, x[, w, h]) so the (x, y) part lines up with DETR's [pos_y, pos_x] image embedding.
    """
    if pos.shape[-1] not in (2, 4):
        raise ValueError(f"positions must have 2 (x, y) or 4 (x, y, w, h) coordinates, got {pos.shape[-1]}")
    scale = 2 * math.pi
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=pos.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    embeds = []
    for c in pos.float().unbind(-1):
        e = c[..., None] * scale / dim_t
        embeds.append(torch.stack((e[..., 0::2].sin(), e[..., 1::2].cos()), dim=-1).flatten(-2))
    embeds[0], embeds[1] = embeds[1], embeds[0]  # (y, x, ...)
    return torch.cat(embeds, dim=-1).to(pos.dtype)


def build_activation(activation: str):
    """``"relu"``/``"gelu"``/``"glu"`` -> the function; ``"prelu"`` -> a (learnable, one
    parameter) ``nn.PReLU`` module, DAB-DETR's choice."""
    if activation == "prelu":
        return nn.PReLU()
    if activation in ("relu", "gelu", "glu"):
        return get_activation_fn(activation)
    raise ValueError(f"activation should be relu, gelu, glu or prelu, not {activation!r}")


class ConditionalAttention(nn.Module):
    """Multi-head attention over already projected ``q``/``k`` (width ``embed_dim``) and ``v``
    (width ``vdim``), then ``out_proj`` (``vdim -> vdim``). The scale is
    ``(embed_dim / num_heads) ** -0.5``: for conditional cross-attention ``embed_dim`` is twice
    the model width, as in the official code.

    ``forward(q[B,Q,E], k[B,N,E], v[B,N,V], key_padding_mask[B,N] (True = ignore), attn_mask)``
    returns ``(out[B,Q,V], weights[B,Q,N])``, the attention averaged over heads.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, vdim: Optional[int] = None):
        super().__init__()
        vdim = embed_dim if vdim is None else vdim
        if embed_dim % num_heads or vdim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} and vdim {vdim} must be divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.vdim = vdim
        self.num_heads = num_heads
        self.dropout = dropout
        self.out_proj = nn.Linear(vdim, vdim)
        nn.init.constant_(self.out_proj.bias, 0.0)

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        attn_mask: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        B, Q, _ = q.shape
        N = k.shape[1]
        h = self.num_heads
        q = q.reshape(B, Q, h, -1).transpose(1, 2)
        k = k.reshape(B, N, h, -1).transpose(1, 2)
        v = v.reshape(B, N, h, -1).transpose(1, 2)
        attn = torch.matmul(q * (q.shape[-1] ** -0.5), k.transpose(-2, -1))  # [B,h,Q,N]
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn = attn.masked_fill(attn_mask, float("-inf"))
            else:
                attn = attn + attn_mask
        if key_padding_mask is not None:
            attn = attn.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        attn = attn.softmax(-1)
        out = torch.matmul(F.dropout(attn, self.dropout, self.training), v)
        out = self.out_proj(out.transpose(1, 2).reshape(B, Q, self.vdim))
        return out, attn.mean(1)


class ConditionalDecoderLayer(nn.Module):
    """One Conditional DETR decoder layer (post-norm).

    Self-attention: ``q = sa_qcontent_proj(f) + sa_qpos_proj(query_pos)``, same for ``k``,
    ``v = sa_v_proj(f)``. Cross-attention per head: ``q = [ca_qcontent_proj(f) (+ ca_qpos_proj(query_pos)
    in the first layer) ; ca_qpos_sine_proj(query_sine_embed)]``, ``k = [ca_kcontent_proj(memory)
    (+ k_pos in the first layer) ; k_pos]`` with ``k_pos = ca_kpos_proj(pos)``, ``v = ca_v_proj(memory)``.
    The decoder removes ``ca_qpos_proj`` from all but the first layer (unless ``keep_query_pos``).

    ``with_self_attention=False`` / ``with_cross_attention=False`` build only the other half (its
    modules; the missing half's are None), run by :meth:`forward_self_attention` /
    :meth:`forward_cross_attention` (cross-attention + FFN); :meth:`forward` runs both in turn.
    SD-DETR shares one self-attention half between two cross-attention halves.
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        keep_query_pos: bool = False,
        with_self_attention: bool = True,
        with_cross_attention: bool = True,
    ):
        super().__init__()
        if not (with_self_attention or with_cross_attention):
            raise ValueError("a decoder layer needs self-attention, cross-attention (+ FFN) or both")
        # Either half can be built alone (SD-DETR shares one self-attention between two
        # cross-attention + FFN branches); the missing half's modules are None.
        sa, ca = with_self_attention, with_cross_attention
        for name in ("sa_qcontent_proj", "sa_qpos_proj", "sa_kcontent_proj", "sa_kpos_proj", "sa_v_proj",
                     "ca_qcontent_proj", "ca_qpos_proj", "ca_kcontent_proj", "ca_kpos_proj", "ca_v_proj",
                     "ca_qpos_sine_proj"):
            setattr(self, name, nn.Linear(d_model, d_model) if (sa if name.startswith("sa_") else ca) else None)
        self.self_attn = ConditionalAttention(d_model, nhead, dropout=dropout) if sa else None
        self.cross_attn = ConditionalAttention(d_model * 2, nhead, dropout=dropout, vdim=d_model) if ca else None
        self.linear1 = nn.Linear(d_model, dim_feedforward) if ca else None
        self.dropout = nn.Dropout(dropout) if ca else None
        self.linear2 = nn.Linear(dim_feedforward, d_model) if ca else None
        self.norm1 = nn.LayerNorm(d_model) if sa else None
        self.norm2 = nn.LayerNorm(d_model) if ca else None
        self.norm3 = nn.LayerNorm(d_model) if ca else None
        self.dropout1 = nn.Dropout(dropout) if sa else None
        self.dropout2 = nn.Dropout(dropout) if ca else None
        self.dropout3 = nn.Dropout(dropout) if ca else None
        self.activation = build_activation(activation)
        self.d_model = d_model
        self.nhead = nhead
        self.keep_query_pos = keep_query_pos
        self.with_self_attention = with_self_attention
        self.with_cross_attention = with_cross_attention

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        pos: Tensor,
        query_pos: Tensor,
        query_sine_embed: Tensor,
        memory_key_padding_mask: Optional[Tensor] = None,
        is_first: bool = False,
        tgt_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """``tgt[B,Q,C]``, ``memory[B,N,C]``, ``pos[B,N,C]`` (memory positions), ``query_pos[B,Q,C]``,
        ``query_sine_embed[B,Q,C]`` (the spatial query before ``ca_qpos_sine_proj``)."""
        tgt = self.forward_self_attention(tgt, query_pos, tgt_mask)
        return self.forward_cross_attention(tgt, memory, pos, query_pos, query_sine_embed,
                                            memory_key_padding_mask, is_first)

    def forward_self_attention(self, tgt: Tensor, query_pos: Tensor, tgt_mask: Optional[Tensor] = None) -> Tensor:
        """Self-attention among the queries, residual and ``norm1``."""
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        tgt2 = self.self_attn(q, k, self.sa_v_proj(tgt), attn_mask=tgt_mask)[0]
        return self.norm1(tgt + self.dropout1(tgt2))

    def forward_cross_attention(
        self,
        tgt: Tensor,
        memory: Tensor,
        pos: Tensor,
        query_pos: Tensor,
        query_sine_embed: Tensor,
        memory_key_padding_mask: Optional[Tensor] = None,
        is_first: bool = False,
    ) -> Tensor:
        """Conditional cross-attention (residual, ``norm2``), then the FFN (residual, ``norm3``)."""
        B, Q, C = tgt.shape
        N = memory.shape[1]
        h = self.nhead
        q_content = self.ca_qcontent_proj(tgt)
        k_content = self.ca_kcontent_proj(memory)
        v = self.ca_v_proj(memory)
        k_pos = self.ca_kpos_proj(pos)
        if is_first or self.keep_query_pos:
            q_content = q_content + self.ca_qpos_proj(query_pos)
            k_content = k_content + k_pos
        q_sine = self.ca_qpos_sine_proj(query_sine_embed)
        q = torch.cat([q_content.view(B, Q, h, C // h), q_sine.view(B, Q, h, C // h)], dim=3).view(B, Q, 2 * C)
        k = torch.cat([k_content.view(B, N, h, C // h), k_pos.view(B, N, h, C // h)], dim=3).view(B, N, 2 * C)
        tgt2 = self.cross_attn(q, k, v, key_padding_mask=memory_key_padding_mask)[0]
        tgt = self.norm2(tgt + self.dropout2(tgt2))

        # ---- FFN
        tgt2 = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(tgt2))


class ConditionalDetrDecoder(nn.Module):
    """Conditional DETR's decoder.

    ``reference = sigmoid(ref_point_head(query_pos))`` (x, y) is fixed for all layers; layer
    ``i`` gets ``query_sine_embed = PE(reference) * (1 if i == 0 else query_scale(f_i))``.
    ``norm`` is applied to each returned output, not to what the next layer sees.

    ``forward(tgt, memory, pos, query_pos, memory_key_padding_mask)`` returns
    ``(hs[L,B,Q,C], reference[B,Q,2])`` with L = num_layers (or 1 without ``return_intermediate``).
    """

    def __init__(
        self,
        decoder_layer: ConditionalDecoderLayer,
        num_layers: int,
        d_model: int = 256,
        return_intermediate: bool = True,
    ):
        super().__init__()
        self.layers = _clones(decoder_layer, num_layers)
        for layer in self.layers[1:]:
            if not layer.keep_query_pos:
                layer.ca_qpos_proj = None
        self.num_layers = num_layers
        self.norm = nn.LayerNorm(d_model)
        self.return_intermediate = return_intermediate
        self.d_model = d_model
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_point_head = MLP(d_model, d_model, 2, 2)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        pos: Tensor,
        query_pos: Tensor,
        memory_key_padding_mask: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        reference = geometry_forward(self.ref_point_head, query_pos).sigmoid()  # float32 under autocast
        sine = gen_sineembed_for_position(reference[..., :2], self.d_model // 2)
        output = tgt
        intermediate: List[Tensor] = []
        for i, layer in enumerate(self.layers):
            query_sine_embed = sine if i == 0 else sine * self.query_scale(output)
            output = layer(output, memory, pos, query_pos, query_sine_embed,
                           memory_key_padding_mask=memory_key_padding_mask, is_first=i == 0)
            if self.return_intermediate:
                intermediate.append(self.norm(output))
        if self.return_intermediate:
            return torch.stack(intermediate), reference
        return self.norm(output).unsqueeze(0), reference


class ConditionalDetrTransformer(nn.Module):
    """DETR's post-norm encoder and Conditional DETR's decoder over zero-initialised targets.

    ``forward(src[B,C,H,W], mask[B,H,W] (True = padding), query_embed[Q,C], pos_embed[B,C,H,W])``
    returns ``(hs[L,B,Q,C], reference[B,Q,2], memory[B,C,H,W])``.
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        return_intermediate_dec: bool = True,
    ):
        super().__init__()
        self.encoder = TransformerEncoder(
            TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation, False),
            num_encoder_layers,
        )
        self.decoder = ConditionalDetrDecoder(
            ConditionalDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation),
            num_decoder_layers,
            d_model,
            return_intermediate=return_intermediate_dec,
        )
        self.d_model = d_model
        self.nhead = nhead
        self._reset_parameters()

    def _reset_parameters(self):
        xavier_init_(self)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos_embed: Tensor):
        bs, c, h, w = src.shape
        src, pos, mask = flatten_single_scale(src, mask, pos_embed)
        query_pos = query_embed.unsqueeze(0).expand(bs, -1, -1)
        memory = self.encoder(src, pos=pos, key_padding_mask=mask)
        hs, reference = self.decoder(torch.zeros_like(query_pos), memory, pos, query_pos,
                                     memory_key_padding_mask=mask)
        return hs, reference, memory.transpose(1, 2).reshape(bs, c, h, w)


@contextmanager
def record_cross_attention(model: nn.Module) -> Iterator[List[Tensor]]:
    """Collects the head-averaged cross-attention maps ``[B, Q, HW]`` of every conditional
    decoder layer (in layer order) during the forward passes run inside the block::

        with record_cross_attention(model) as maps:
            model.forward_features(images, masks)
        # maps[i][b, q] reshaped to the feature map's (H, W): where query q of layer i looks

    Works for every model built from :class:`ConditionalDecoderLayer` (Conditional DETR,
    DAB-DETR, ...); the maps are detached.
    """
    maps: List[Tensor] = []
    hooks = [
        layer.cross_attn.register_forward_hook(lambda _m, _i, out: maps.append(out[1].detach()))
        for layer in model.modules()
        if isinstance(layer, ConditionalDecoderLayer) and layer.cross_attn is not None
    ]
    if not hooks:
        raise ValueError(f"{type(model).__name__} has no ConditionalDecoderLayer to record")
    try:
        yield maps
    finally:
        for h in hooks:
            h.remove()
