"""DETR's encoder-decoder transformer, in pieces other methods can reuse.

The layers follow the official implementation (facebookresearch/detr,
``models/transformer.py``) and keep its parameter names
(``self_attn.in_proj_weight``, ``multihead_attn``, ``linear1``, ``norm1`` ...),
so official checkpoints load after renaming only the backbone. The one change:
tensors are batch-first (``[B, N, C]``) instead of sequence-first.

- :class:`TransformerEncoderLayer` / :class:`TransformerDecoderLayer`: one
  layer, post-norm by default (``normalize_before=True`` gives pre-norm).
  Position embeddings are added to queries and keys (never values) at every layer.
- :class:`TransformerEncoder` / :class:`TransformerDecoder`: stacks of deep
  copies of a layer; the decoder's final norm is applied to every
  intermediate output it returns (DETR's auxiliary decoding losses).
- :class:`DetrTransformer`: the two stacks wired the DETR way (zero-initialised
  targets, learned query positions, Xavier init).
"""
import copy
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "get_activation_fn",
    "with_pos_embed",
    "xavier_init_",
    "flatten_single_scale",
    "TransformerEncoderLayer",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerDecoder",
    "DetrTransformer",
]


def get_activation_fn(activation: str):
    """``"relu"``, ``"gelu"`` or ``"glu"`` -> the functional form."""
    if activation == "relu":
        return F.relu
    if activation == "gelu":
        return F.gelu
    if activation == "glu":
        return F.glu
    raise ValueError(f"activation should be relu, gelu or glu, not {activation!r}")


def with_pos_embed(tensor: Tensor, pos: Optional[Tensor]) -> Tensor:
    return tensor if pos is None else tensor + pos


def _clones(module: nn.Module, n: int) -> nn.ModuleList:
    """``n`` independent deep copies of ``module`` (the layer stacks of every DETR variant)."""
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


def xavier_init_(module: nn.Module) -> None:
    """Xavier-uniform initialisation of every parameter of ``module`` with more than one
    dimension (the official DETR-family transformers' ``_reset_parameters``)."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


def flatten_single_scale(src: Tensor, mask: Tensor, pos_embed: Tensor):
    """``src/pos_embed [B,C,H,W]``, ``mask [B,H,W]`` -> ``([B,HW,C], [B,HW,C], [B,HW])``
    token sequences: the single-scale transformers' input."""
    return src.flatten(2).transpose(1, 2), pos_embed.flatten(2).transpose(1, 2), mask.flatten(1)


class TransformerEncoderLayer(nn.Module):
    """Self-attention + FFN, each followed (post-norm) or preceded (pre-norm) by LayerNorm.

    ``forward(src[B,N,C], pos=None, key_padding_mask[B,N]=None (True = padding))``.
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        normalize_before: bool = False,
    ):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = get_activation_fn(activation)
        self.normalize_before = normalize_before

    def _ffn(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def forward(
        self,
        src: Tensor,
        pos: Optional[Tensor] = None,
        key_padding_mask: Optional[Tensor] = None,
        attn_mask: Optional[Tensor] = None,
    ) -> Tensor:
        if self.normalize_before:
            x = self.norm1(src)
            q = k = with_pos_embed(x, pos)
            src = src + self.dropout1(
                self.self_attn(q, k, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                               need_weights=False)[0]
            )
            return src + self.dropout2(self._ffn(self.norm2(src)))
        q = k = with_pos_embed(src, pos)
        src2 = self.self_attn(q, k, src, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                              need_weights=False)[0]
        src = self.norm1(src + self.dropout1(src2))
        return self.norm2(src + self.dropout2(self._ffn(src)))


class TransformerDecoderLayer(nn.Module):
    """Self-attention among queries, cross-attention to the memory, FFN.

    ``forward(tgt[B,Q,C], memory[B,N,C], pos=None (memory positions),
    query_pos=None, memory_key_padding_mask[B,N]=None (True = padding))``.
    ``query_pos`` is added to the queries (and self-attention keys), ``pos`` to
    the cross-attention keys.
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        normalize_before: bool = False,
    ):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = get_activation_fn(activation)
        self.normalize_before = normalize_before

    def _ffn(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        pos: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None,
        memory_key_padding_mask: Optional[Tensor] = None,
        tgt_mask: Optional[Tensor] = None,
        tgt_key_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        mem_k = with_pos_embed(memory, pos)
        if self.normalize_before:
            x = self.norm1(tgt)
            q = k = with_pos_embed(x, query_pos)
            tgt = tgt + self.dropout1(
                self.self_attn(q, k, x, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask,
                               need_weights=False)[0]
            )
            x = self.norm2(tgt)
            tgt = tgt + self.dropout2(
                self.multihead_attn(with_pos_embed(x, query_pos), mem_k, memory,
                                    key_padding_mask=memory_key_padding_mask, need_weights=False)[0]
            )
            return tgt + self.dropout3(self._ffn(self.norm3(tgt)))
        q = k = with_pos_embed(tgt, query_pos)
        tgt2 = self.self_attn(q, k, tgt, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask,
                              need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.multihead_attn(with_pos_embed(tgt, query_pos), mem_k, memory,
                                   key_padding_mask=memory_key_padding_mask, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        return self.norm3(tgt + self.dropout3(self._ffn(tgt)))


class TransformerEncoder(nn.Module):
    """``num_layers`` copies of ``encoder_layer``, then the optional ``norm``
    (None for post-norm, a LayerNorm for pre-norm as in DETR)."""

    def __init__(self, encoder_layer: nn.Module, num_layers: int, norm: Optional[nn.Module] = None):
        super().__init__()
        self.layers = _clones(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src: Tensor, pos: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None) -> Tensor:
        output = src
        for layer in self.layers:
            output = layer(output, pos=pos, key_padding_mask=key_padding_mask)
        if self.norm is not None:
            output = self.norm(output)
        return output


class TransformerDecoder(nn.Module):
    """``num_layers`` copies of ``decoder_layer``.

    Returns ``[L, B, Q, C]``: with ``return_intermediate`` the output of every
    layer (L = num_layers), else only the last one (L = 1). ``norm`` (DETR's
    final LayerNorm) is applied to each returned output but not to what is fed
    to the next layer, as in the official code.
    """

    def __init__(
        self,
        decoder_layer: nn.Module,
        num_layers: int,
        norm: Optional[nn.Module] = None,
        return_intermediate: bool = True,
    ):
        super().__init__()
        self.layers = _clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm
        self.return_intermediate = return_intermediate

    def _out(self, x: Tensor) -> Tensor:
        return x if self.norm is None else self.norm(x)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        pos: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None,
        memory_key_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        output = tgt
        intermediate: List[Tensor] = []
        for layer in self.layers:
            output = layer(output, memory, pos=pos, query_pos=query_pos,
                           memory_key_padding_mask=memory_key_padding_mask)
            if self.return_intermediate:
                intermediate.append(self._out(output))
        if self.return_intermediate:
            return torch.stack(intermediate)
        return self._out(output).unsqueeze(0)


class DetrTransformer(nn.Module):
    """DETR's transformer: encoder over the flattened feature map, decoder over
    ``num_queries`` zero-initialised targets with learned query positions.

    ``forward(src[B,C,H,W], mask[B,H,W] (True = padding), query_embed[Q,C], pos_embed[B,C,H,W])``
    returns ``(hs[L,B,Q,C], memory[B,C,H,W])``; ``hs`` holds every decoder
    layer's normalised output when ``return_intermediate_dec`` (the default).
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
        normalize_before: bool = False,
        return_intermediate_dec: bool = True,
    ):
        super().__init__()
        enc_layer = TransformerEncoderLayer(
            d_model, nhead, dim_feedforward, dropout, activation, normalize_before
        )
        self.encoder = TransformerEncoder(
            enc_layer, num_encoder_layers, nn.LayerNorm(d_model) if normalize_before else None
        )
        dec_layer = TransformerDecoderLayer(
            d_model, nhead, dim_feedforward, dropout, activation, normalize_before
        )
        self.decoder = TransformerDecoder(
            dec_layer, num_decoder_layers, nn.LayerNorm(d_model),
            return_intermediate=return_intermediate_dec,
        )
        self.d_model = d_model
        self.nhead = nhead
        self._reset_parameters()

    def _reset_parameters(self):
        xavier_init_(self)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos_embed: Tensor):
        bs, c, h, w = src.shape
        src, pos_embed, mask = flatten_single_scale(src, mask, pos_embed)  # [B, HW, C]
        query_pos = query_embed.unsqueeze(0).expand(bs, -1, -1)
        tgt = torch.zeros_like(query_pos)
        memory = self.encoder(src, pos=pos_embed, key_padding_mask=mask)
        hs = self.decoder(tgt, memory, pos=pos_embed, query_pos=query_pos,
                          memory_key_padding_mask=mask)
        return hs, memory.transpose(1, 2).reshape(bs, c, h, w)
