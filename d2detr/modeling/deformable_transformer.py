"""Generic deformable-attention transformer pieces (Deformable DETR, reused by DAB-Deformable-DETR,
DINO and Focus-DETR).

Everything follows the official Deformable DETR (fundamentalvision/Deformable-DETR,
``models/deformable_transformer.py``), including its parameter names (``self_attn``,
``cross_attn``, ``linear1``/``linear2``, ``norm1..3``), so official checkpoints map one to one:

* :class:`DeformableTransformerEncoderLayer` -- multi-scale deformable self-attention + FFN, post-norm.
* :class:`DeformableTransformerDecoderLayer` -- query self-attention, deformable cross-attention,
  FFN, post-norm. An optional ``self_attn_mask`` serves DINO's denoising groups.
* :class:`DeformableTransformerEncoder` / :class:`DeformableTransformerDecoder` -- the stacks.
  The decoder does iterative box refinement when ``decoder.bbox_embed`` is set (a ModuleList,
  one head per layer) and returns every layer's output and reference points.
* :func:`flatten_multi_level`, :func:`get_valid_ratio`, :func:`gen_encoder_output_proposals`,
  :func:`get_proposal_pos_embed` -- the shared bookkeeping around them.

Conventions: batch first everywhere; masks are True on padding; reference points are (x, y)
or (cx, cy, w, h) normalised to the *valid* image area except where a docstring says
otherwise; ``spatial_shapes`` is an int64 ``[L, 2]`` tensor of (H, W), and wherever Python
loops over levels a list of ``(H, W)`` ints (``spatial_shapes_list``) is taken instead, so that
``torch.export`` sees symbolic sizes and no data-dependent ``.tolist()``.
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from d2detr.layers.box_ops import inverse_sigmoid
from d2detr.layers.dynamic_shapes import num_selected
from d2detr.layers.mlp import MLP
from d2detr.layers.ms_deform_attn import MultiScaleDeformableAttention
from d2detr.layers.precision import geometry_dtype, geometry_forward

from .conditional_transformer import gen_sineembed_for_position
from .transformer import _clones, get_activation_fn, with_pos_embed, xavier_init_

__all__ = [
    "DeformableTransformerEncoderLayer",
    "DeformableTransformerDecoderLayer",
    "DeformableTransformerEncoder",
    "DeformableTransformerDecoder",
    "AnchorDeformableDecoder",
    "DeformableDetrTransformer",
    "flatten_multi_level",
    "gather_tokens",
    "geometry_dtype",
    "get_valid_ratio",
    "gen_encoder_output_proposals",
    "get_proposal_pos_embed",
    "reset_deformable_parameters",
]


def reset_deformable_parameters(module: nn.Module) -> None:
    """The official Deformable DETR initialisation of a transformer's matrices: Xavier for
    every one, then each ``MultiScaleDeformableAttention``'s own scheme."""
    xavier_init_(module)
    for m in module.modules():
        if isinstance(m, MultiScaleDeformableAttention):
            m._reset_parameters()


class DeformableTransformerEncoderLayer(nn.Module):
    """Deformable self-attention over the flattened multi-level feature map, then an FFN.

    Post-norm, dropout after attention and in the FFN, as in the official code.
    ``compute_in_float32``: the mixed-precision policy of the deformable attention (see
    :class:`~d2detr.layers.ms_deform_attn.MultiScaleDeformableAttention`); None = the library default.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        ffn_dim: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        compute_in_float32: Optional[bool] = None,
    ):
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(embed_dim, num_heads, num_levels, num_points,
                                                       compute_in_float32=compute_in_float32)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(embed_dim)

        self.linear1 = nn.Linear(embed_dim, ffn_dim)
        self.activation = get_activation_fn(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, embed_dim)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(embed_dim)

    def forward_ffn(self, src: Tensor) -> Tensor:
        src2 = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))

    def forward(
        self,
        src: Tensor,
        pos: Optional[Tensor],
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """``src``/``pos`` ``[N, S, C]``; ``reference_points`` ``[N, S, L, 2]``; mask ``[N, S]``."""
        src2 = self.self_attn(
            with_pos_embed(src, pos), reference_points, src, spatial_shapes, level_start_index, padding_mask
        )
        src = self.norm1(src + self.dropout1(src2))
        return self.forward_ffn(src)


class DeformableTransformerDecoderLayer(nn.Module):
    """Self-attention among the queries, deformable cross-attention into the memory, FFN.

    ``self_attn`` is ``nn.MultiheadAttention`` (batch first) with queries and keys
    ``tgt + query_pos`` and values ``tgt``, attention dropout = ``dropout`` as in the official code.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        ffn_dim: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        compute_in_float32: Optional[bool] = None,
    ):
        super().__init__()
        # cross attention
        self.cross_attn = MultiScaleDeformableAttention(embed_dim, num_heads, num_levels, num_points,
                                                        compute_in_float32=compute_in_float32)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(embed_dim)
        # self attention
        self.self_attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(embed_dim)
        # ffn
        self.linear1 = nn.Linear(embed_dim, ffn_dim)
        self.activation = get_activation_fn(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, embed_dim)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(embed_dim)

    def forward_ffn(self, tgt: Tensor) -> Tensor:
        tgt2 = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(tgt2))

    def forward(
        self,
        tgt: Tensor,
        query_pos: Optional[Tensor],
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        memory_padding_mask: Optional[Tensor] = None,
        self_attn_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """``tgt``/``query_pos`` ``[N, Q, C]``; ``reference_points`` ``[N, Q, L, 2|4]``;
        ``memory`` ``[N, S, C]``; ``self_attn_mask`` ``[Q, Q]`` or ``[N*heads, Q, Q]``, True = blocked."""
        q = k = with_pos_embed(tgt, query_pos)
        tgt2 = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(tgt2))

        tgt2 = self.cross_attn(
            with_pos_embed(tgt, query_pos),
            reference_points,
            memory,
            spatial_shapes,
            level_start_index,
            memory_padding_mask,
        )
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        return self.forward_ffn(tgt)


class DeformableTransformerEncoder(nn.Module):
    """``num_layers`` copies of ``encoder_layer``; reference points are the pixel centres of
    every level, normalised by the valid ratios."""

    def __init__(self, encoder_layer: nn.Module, num_layers: int):
        super().__init__()
        self.layers = _clones(encoder_layer, num_layers)
        self.num_layers = num_layers

    @staticmethod
    def get_reference_points(
        spatial_shapes_list: Sequence[Tuple[int, int]], valid_ratios: Tensor
    ) -> Tensor:
        """``[N, S, L, 2]``: the centre of each cell of each level in (x, y), relative to that
        level's valid area, then scaled by every level's valid ratio (as the official code)."""
        reference_points_list = []
        device, dtype = valid_ratios.device, valid_ratios.dtype
        for lvl, (H, W) in enumerate(spatial_shapes_list):
            # arange + 0.5 == linspace(0.5, H - 0.5, H), and keeps H symbolic under torch.export
            ref_y, ref_x = torch.meshgrid(
                torch.arange(H, dtype=dtype, device=device) + 0.5,
                torch.arange(W, dtype=dtype, device=device) + 0.5,
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * H)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * W)
            reference_points_list.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(reference_points_list, 1)
        return reference_points[:, :, None] * valid_ratios[:, None]

    def forward(
        self,
        src: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        pos: Optional[Tensor] = None,
        padding_mask: Optional[Tensor] = None,
        spatial_shapes_list: Optional[List[Tuple[int, int]]] = None,
    ) -> Tensor:
        if spatial_shapes_list is None:
            spatial_shapes_list = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        reference_points = self.get_reference_points(spatial_shapes_list, valid_ratios)
        output = src
        for layer in self.layers:
            output = layer(output, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return output


class DeformableTransformerDecoder(nn.Module):
    """``num_layers`` copies of ``decoder_layer``.

    With ``self.bbox_embed`` (a ModuleList of box heads, one entry per layer, set by the detector)
    each layer refines the reference points: ``sigmoid(bbox_embed[i](out) + inverse_sigmoid(ref))``,
    detached before the next layer (iterative bounding box refinement). ``self.class_embed`` is
    only a place to hang the two-stage heads; the decoder itself does not use it.

    Args:
        decoder_layer, num_layers: the stack.
        return_intermediate: return every layer's output (the detectors need it).
        look_forward_twice: DINO's refinement. The next layer still starts from the *detached*
            refined reference, but ``references[i]`` is the undetached one, so the box the
            detector predicts at layer ``i + 1`` on top of it also trains layer ``i``'s box head.
            False (Deformable DETR, DAB-Deformable-DETR): detached everywhere.
        norm: applied to every layer's output before it is returned for the prediction heads
            (DINO's decoder LayerNorm); the refinement inside the decoder uses the raw output,
            as in the official code.

    Attributes the detector sets: ``bbox_embed``, ``class_embed`` and ``inverse_sigmoid_eps`` (the
    eps of the logit-space refinement: 1e-5 in Deformable DETR, 1e-3 in DINO).

    Returns ``(hs [num_layers, N, Q, C], references [num_layers, N, Q, 2|4])`` where
    ``references[i]`` are the reference points *after* layer ``i`` (what the box of layer ``i + 1``
    is predicted from); with ``return_intermediate=False`` only the last layer, with a leading dim of 1.
    """

    #: Whether the layers' positional queries come from the reference boxes (DAB, DINO) rather
    #: than from the caller's ``query_pos``.
    derives_query_pos: bool = False

    def __init__(
        self,
        decoder_layer: nn.Module,
        num_layers: int,
        return_intermediate: bool = True,
        look_forward_twice: bool = False,
        norm: Optional[nn.Module] = None,
    ):
        super().__init__()
        self.layers = _clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.return_intermediate = return_intermediate
        self.look_forward_twice = look_forward_twice
        self.norm = norm
        self.bbox_embed: Optional[nn.ModuleList] = None
        self.class_embed: Optional[nn.ModuleList] = None
        self.inverse_sigmoid_eps = 1e-5

    @staticmethod
    def scale_reference_points(reference_points: Tensor, valid_ratios: Tensor) -> Tensor:
        """``[N, Q, 2|4]`` relative to the valid area -> ``[N, Q, L, 2|4]`` relative to each padded level."""
        if reference_points.shape[-1] == 4:
            return reference_points[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
        if reference_points.shape[-1] == 2:
            return reference_points[:, :, None] * valid_ratios[:, None]
        raise ValueError(f"reference_points must end in 2 or 4, got {tuple(reference_points.shape)}")

    @staticmethod
    def refine_reference_points(delta: Tensor, reference_points: Tensor, eps: float = 1e-5) -> Tensor:
        """Box refinement in logit space; 2-d references become 4-d boxes."""
        if reference_points.shape[-1] == 4:
            return (delta + inverse_sigmoid(reference_points, eps)).sigmoid()
        return torch.cat([delta[..., :2] + inverse_sigmoid(reference_points, eps), delta[..., 2:]], -1).sigmoid()

    def layer_query_pos(
        self, lid: int, output: Tensor, reference_points_input: Tensor, query_pos: Optional[Tensor]
    ) -> Optional[Tensor]:
        """The positional query of layer ``lid``: the caller's ``query_pos`` (Deformable DETR)."""
        return query_pos

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
        output = tgt
        intermediate = []
        intermediate_reference_points = []
        for lid, layer in enumerate(self.layers):
            reference_points_input = self.scale_reference_points(reference_points, valid_ratios)
            output = layer(
                output,
                self.layer_query_pos(lid, output, reference_points_input, query_pos),
                reference_points_input,
                memory,
                spatial_shapes,
                level_start_index,
                memory_padding_mask,
                self_attn_mask,
            )
            predicted_from = reference_points
            if self.bbox_embed is not None:
                refined = self.refine_reference_points(
                    self.bbox_embed[lid](output), reference_points, self.inverse_sigmoid_eps
                )
                reference_points = refined.detach()
                predicted_from = refined if self.look_forward_twice else reference_points
            if self.return_intermediate:
                intermediate.append(output if self.norm is None else self.norm(output))
                intermediate_reference_points.append(predicted_from)
        if self.return_intermediate:
            return torch.stack(intermediate), torch.stack(intermediate_reference_points)
        output = output if self.norm is None else self.norm(output)
        return output[None], predicted_from[None]


class AnchorDeformableDecoder(DeformableTransformerDecoder):
    """Deformable decoder whose positional queries come from 4-D anchor boxes (DAB-Deformable-DETR,
    DINO): layer ``i`` uses ``ref_point_head(PE(anchor_i))``, times ``query_scale(out_i)`` for the
    layers after the first when ``query_scale`` is True (DAB-Deformable-DETR; DINO has no scale).
    ``PE`` is :func:`~d2detr.modeling.conditional_transformer.gen_sineembed_for_position` of the
    anchor scaled by the first level's valid ratios, ``embed_dim / 2`` features per coordinate.

    ``forward`` takes ``reference_points [N, Q, 4]`` (sigmoid anchors) and ``query_pos=None``;
    everything else is :class:`DeformableTransformerDecoder`'s.
    """

    derives_query_pos = True

    def __init__(
        self,
        decoder_layer: nn.Module,
        num_layers: int,
        embed_dim: int = 256,
        return_intermediate: bool = True,
        query_scale: bool = True,
        look_forward_twice: bool = False,
        norm: Optional[nn.Module] = None,
    ):
        super().__init__(decoder_layer, num_layers, return_intermediate, look_forward_twice, norm)
        self.embed_dim = embed_dim
        self.query_scale = MLP(embed_dim, embed_dim, embed_dim, 2) if query_scale else None
        self.ref_point_head = MLP(2 * embed_dim, embed_dim, embed_dim, 2)

    def layer_query_pos(self, lid, output, reference_points_input, query_pos):
        sine = gen_sineembed_for_position(reference_points_input[:, :, 0, :], self.embed_dim // 2)
        pos = self.ref_point_head(sine)
        if self.query_scale is not None and lid != 0:
            pos = pos * self.query_scale(output)
        return pos

    def forward(self, tgt, reference_points, memory, spatial_shapes, level_start_index, valid_ratios,
                query_pos=None, memory_padding_mask=None, self_attn_mask=None):
        if query_pos is not None:
            raise ValueError("this decoder derives the positional queries from the anchors; pass query_pos=None")
        if reference_points.shape[-1] != 4:
            raise ValueError(f"anchors must be (x, y, w, h), got shape {tuple(reference_points.shape)}")
        return super().forward(tgt, reference_points, memory, spatial_shapes, level_start_index, valid_ratios,
                               None, memory_padding_mask, self_attn_mask)


def get_valid_ratio(mask: Tensor) -> Tensor:
    """``mask[N, H, W]`` (True = padding) -> ``[N, 2]`` valid (width, height) fractions."""
    _, H, W = mask.shape
    valid_H = torch.sum(~mask[:, :, 0], 1)
    valid_W = torch.sum(~mask[:, 0, :], 1)
    return torch.stack([valid_W.float() / W, valid_H.float() / H], -1)


def level_start_indices(spatial_shapes: Tensor) -> Tensor:
    """``spatial_shapes [L, 2]`` -> where each level starts in the flattened tokens, ``[L]``."""
    return torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))


def flatten_multi_level(
    srcs: Sequence[Tensor],
    masks: Sequence[Tensor],
    pos_embeds: Optional[Sequence[Tensor]],
    level_embed: Optional[Tensor] = None,
):
    """Flattens per-level ``[N, C, H, W]`` features, ``[N, H, W]`` masks and positions.

    Returns ``(src_flatten [N,S,C], mask_flatten [N,S], lvl_pos_embed_flatten [N,S,C],
    spatial_shapes [L,2] int64, level_start_index [L] int64, valid_ratios [N,L,2],
    spatial_shapes_list)``; ``level_embed[l]`` is added to level ``l``'s position embedding.
    ``pos_embeds`` None (levels without positions): ``lvl_pos_embed_flatten`` is None.
    """
    src_flatten, mask_flatten, lvl_pos_embed_flatten = [], [], []
    spatial_shapes_list: List[Tuple[int, int]] = []
    for lvl, (src, mask) in enumerate(zip(srcs, masks)):
        h, w = src.shape[-2:]
        spatial_shapes_list.append((h, w))
        src_flatten.append(src.flatten(2).transpose(1, 2))
        mask_flatten.append(mask.flatten(1))
        if pos_embeds is not None:
            pos_embed = pos_embeds[lvl].flatten(2).transpose(1, 2)
            if level_embed is not None:
                pos_embed = pos_embed + level_embed[lvl].view(1, 1, -1)
            lvl_pos_embed_flatten.append(pos_embed)
    src_flatten = torch.cat(src_flatten, 1)
    mask_flatten = torch.cat(mask_flatten, 1)
    lvl_pos_embed_flatten = torch.cat(lvl_pos_embed_flatten, 1) if pos_embeds is not None else None
    # torch.full keeps the sizes dynamic under torch.jit.trace and torch.export (torch.as_tensor
    # would record them as constants / specialise them)
    spatial_shapes = torch.stack(
        [torch.stack([torch.full((), s, dtype=torch.long, device=src_flatten.device) for s in hw]) for hw in spatial_shapes_list]
    )
    level_start_index = level_start_indices(spatial_shapes)
    # geometry stays at least float32 under bf16/fp16 autocast (a bf16 cell centre is up to a
    # whole cell off on a 167-cell level)
    valid_ratios = torch.stack([get_valid_ratio(m) for m in masks], 1).to(geometry_dtype(src_flatten.dtype))
    return (
        src_flatten,
        mask_flatten,
        lvl_pos_embed_flatten,
        spatial_shapes,
        level_start_index,
        valid_ratios,
        spatial_shapes_list,
    )


def append_decoder_only_levels(memory: Tensor, mask_flatten: Tensor, spatial_shapes: Tensor, valid_ratios: Tensor,
                               srcs: Sequence[Tensor], masks: Sequence[Tensor]):
    """The decoder's memory: the encoder's ``memory [N,S,C]`` followed by the flattened
    ``srcs`` (levels the encoder skipped), with the padding mask, ``spatial_shapes``,
    ``level_start_index`` and ``valid_ratios`` of all levels in that order."""
    extra, extra_mask, _, extra_shapes, _, extra_ratios, _ = flatten_multi_level(srcs, masks, None)
    spatial_shapes = torch.cat([spatial_shapes, extra_shapes])
    level_start_index = level_start_indices(spatial_shapes)
    return (torch.cat([memory, extra.to(memory.dtype)], 1), torch.cat([mask_flatten, extra_mask], 1),
            spatial_shapes, level_start_index, torch.cat([valid_ratios, extra_ratios.to(valid_ratios.dtype)], 1))


def gen_encoder_output_proposals(
    memory: Tensor,
    memory_padding_mask: Tensor,
    spatial_shapes_list: Sequence[Tuple[int, int]],
    base_scale: float = 0.05,
) -> Tuple[Tensor, Tensor]:
    """One proposal per encoder token (two-stage Deformable DETR, DINO).

    A proposal is centred on its cell (normalised by the valid size) with width = height =
    ``base_scale * 2**lvl``. Returns ``(output_memory [N,S,C], output_proposals [N,S,4])``:
    the memory with padded or invalid positions zeroed (the caller applies its
    ``enc_output`` projection and norm), and the proposals in logit space
    (``inverse_sigmoid``), ``inf`` where padded or outside ``(0.01, 0.99)``.
    """
    N = memory.shape[0]
    dtype = geometry_dtype(memory.dtype)
    proposals = []
    _cur = 0
    for lvl, (H, W) in enumerate(spatial_shapes_list):
        mask_flatten_ = memory_padding_mask[:, _cur : (_cur + H * W)].view(N, H, W, 1)
        valid_H = torch.sum(~mask_flatten_[:, :, 0, 0], 1)
        valid_W = torch.sum(~mask_flatten_[:, 0, :, 0], 1)
        grid_y, grid_x = torch.meshgrid(
            torch.arange(H, dtype=dtype, device=memory.device),  # == linspace(0, H - 1, H)
            torch.arange(W, dtype=dtype, device=memory.device),
            indexing="ij",
        )
        grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
        scale = torch.cat([valid_W.unsqueeze(-1), valid_H.unsqueeze(-1)], 1).view(N, 1, 1, 2).to(dtype)
        grid = (grid.unsqueeze(0).expand(N, -1, -1, -1) + 0.5) / scale
        wh = torch.ones_like(grid) * base_scale * (2.0**lvl)
        proposals.append(torch.cat((grid, wh), -1).view(N, -1, 4))
        _cur += H * W
    output_proposals = torch.cat(proposals, 1)
    output_proposals_valid = ((output_proposals > 0.01) & (output_proposals < 0.99)).all(-1, keepdim=True)
    output_proposals = torch.log(output_proposals / (1 - output_proposals))
    output_proposals = output_proposals.masked_fill(memory_padding_mask.unsqueeze(-1), float("inf"))
    output_proposals = output_proposals.masked_fill(~output_proposals_valid, float("inf"))

    output_memory = memory.masked_fill(memory_padding_mask.unsqueeze(-1), float(0))
    output_memory = output_memory.masked_fill(~output_proposals_valid, float(0))
    return output_memory, output_proposals


def get_proposal_pos_embed(proposals: Tensor, num_pos_feats: int = 128, temperature: int = 10000) -> Tensor:
    """Sine embedding of ``sigmoid(proposals)`` ``[N, Q, 4]`` (logits) -> ``[N, Q, 4*num_pos_feats]``
    (scale 2π, sin/cos interleaved per coordinate, as the official ``get_proposal_pos_embed``)."""
    scale = 2 * math.pi
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    proposals = proposals.sigmoid().float() * scale
    pos = proposals[:, :, :, None] / dim_t
    pos = torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)
    return pos


def gather_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """``tokens [N, S, D]``, ``index [N, K]`` -> ``[N, K, D]``."""
    return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class DeformableDetrTransformer(nn.Module):
    """The multi-scale encoder-decoder of Deformable DETR and its successors.

    Level embedding, flattening, the deformable encoder, the encoder proposals and how the
    decoder's queries are made from them or from learned embeddings, then the decoder. The queries
    (the hooks a successor overrides: :meth:`select_queries`, :meth:`encode`, :meth:`proposal_heads`):

    * single-stage, ``decoder.derives_query_pos`` False (Deformable DETR): ``query_embed [Q, 2C]``
      is split into positional and content queries; 2-d reference points are
      ``sigmoid(reference_points(query_pos))``;
    * single-stage with an anchor decoder (DAB-Deformable-DETR): ``query_embed`` is
      ``(content [Q, C], anchor logits [Q, 4])``;
    * two-stage: a detection head on every encoder token; the top ``two_stage_num_proposals`` by
      the first class logit (class-agnostic objectness: the encoder loss relabels every target 0)
      give the reference boxes (detached); their sine embedding through ``pos_trans`` gives the
      positional and content queries (an anchor decoder takes only the content half).
      :class:`~d2detr.modeling.dino_transformer.DinoTransformer` selects differently.

    Args:
        encoder, decoder: the stacks.
        embed_dim: model width (256).
        num_feature_levels: number of input levels (4; 1 for single-scale).
        two_stage: queries from the encoder proposals; the proposal heads are
            :meth:`proposal_heads` (set by the detector).
        two_stage_num_proposals: how many proposals become queries (300), fewer when an image
            has fewer tokens.
        num_decoder_only_levels: the first (finest) input levels that only the decoder's
            cross-attention reads, as values: they skip the encoder (no self-attention over their
            many tokens, no proposals from them), so a stride-4 map for small objects costs a 1x1
            projection and the decoder's value projection instead of 4x the encoder's tokens.
            They need no level embedding (values carry no position) and sit after the encoded
            levels in the decoder's memory, so the decoder layers have ``num_feature_levels``
            levels and the encoder's ``num_feature_levels - num_decoder_only_levels``. 0: all
            levels are encoded, as in every paper here.

    ``forward(srcs, masks, pos_embeds, query_embed=None, denoising_queries=None)`` returns
    ``(hs [L, N, Q', C], init_reference [N, Q', 2|4], inter_references [L, N, Q', 2|4],
    enc_logits, enc_coords_unact)``: the decoder outputs, its input references and the references
    after each layer (see :class:`DeformableTransformerDecoder`), and for two-stage the encoder
    head's class logits and box logits (every token ``[N, S, ...]`` here, the selected ones in
    DINO), else None. ``Q'`` counts the ``denoising_queries`` first, then the matching queries.
    An :meth:`encode` that also reports outputs of its own adds them as a sixth element (a dict).
    """

    #: Two-stage queries take their content (and, without an anchor decoder, position) from
    #: ``pos_trans`` of the proposals' sine embedding (Deformable DETR) -- DINO learns them instead.
    queries_from_proposal_embedding: bool = True
    #: H-DETR's one-to-many queries in training; only DINO's transformer has them
    num_one2many_queries: int = 0

    def __init__(
        self,
        encoder: DeformableTransformerEncoder,
        decoder: DeformableTransformerDecoder,
        embed_dim: int = 256,
        num_feature_levels: int = 4,
        two_stage: bool = False,
        two_stage_num_proposals: int = 300,
        num_decoder_only_levels: int = 0,
    ):
        super().__init__()
        if not 0 <= num_decoder_only_levels < num_feature_levels:
            raise ValueError(f"num_decoder_only_levels must be in [0, num_feature_levels={num_feature_levels}), "
                             f"got {num_decoder_only_levels}")
        encoded_levels = num_feature_levels - num_decoder_only_levels
        for stack, name, expected in ((encoder, "encoder", encoded_levels), (decoder, "decoder", num_feature_levels)):
            for layer in getattr(stack, "layers", ()):
                attn = getattr(layer, "self_attn" if name == "encoder" else "cross_attn", None)
                levels = getattr(attn, "num_levels", expected)
                if levels != expected:
                    raise ValueError(
                        f"the {name} layers attend to {levels} levels, but {num_feature_levels} feature levels with "
                        f"num_decoder_only_levels={num_decoder_only_levels} give the {name} {expected}"
                    )
        self.encoder = encoder
        self.decoder = decoder
        self.embed_dim = embed_dim
        self.num_feature_levels = num_feature_levels
        self.num_decoder_only_levels = num_decoder_only_levels
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals

        self.level_embed = nn.Parameter(torch.empty(encoded_levels, embed_dim))
        if two_stage:
            self.enc_output = nn.Linear(embed_dim, embed_dim)
            self.enc_output_norm = nn.LayerNorm(embed_dim)
            if self.queries_from_proposal_embedding:
                self.pos_trans = nn.Linear(embed_dim * 2, embed_dim * 2)
                self.pos_trans_norm = nn.LayerNorm(embed_dim * 2)
        elif not decoder.derives_query_pos:
            self.reference_points = nn.Linear(embed_dim, 2)
        self.enc_out_class_embed: Optional[nn.Module] = None
        self.enc_out_bbox_embed: Optional[nn.Module] = None
        self.reset_parameters()

    def reset_parameters(self):
        """The official initialisation: Xavier for every matrix, then the deformable
        attention's own scheme, Xavier reference points and normal level embeddings."""
        reset_deformable_parameters(self)
        if hasattr(self, "reference_points"):
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    # ----------------------------------------------------------------- hooks
    def encode(self, src_flatten: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
               valid_ratios: Tensor, pos: Tensor, padding_mask: Tensor,
               spatial_shapes_list: List[Tuple[int, int]]) -> Tensor:
        """The encoder over the flattened levels -> memory ``[N, S, C]``, or ``(memory, outputs)``
        where ``outputs`` is a dict of tensors the detector should see too (Focus-DETR's foreground
        scores and kept tokens); :meth:`forward` then returns it as a sixth element."""
        return self.encoder(src_flatten, spatial_shapes, level_start_index, valid_ratios, pos=pos,
                            padding_mask=padding_mask, spatial_shapes_list=spatial_shapes_list)

    def proposal_heads(self) -> Tuple[nn.Module, nn.Module]:
        """The (class, box) heads applied to every encoder token in two-stage models: the
        transformer's own ``enc_out_class_embed`` / ``enc_out_bbox_embed`` when the detector set
        them (shared decoder heads, DINO), else the extra last entry of the decoder's per-layer
        heads (Deformable DETR)."""
        if self.enc_out_class_embed is not None:
            return self.enc_out_class_embed, self.enc_out_bbox_embed
        if self.decoder.class_embed is None or len(self.decoder.class_embed) <= self.decoder.num_layers:
            raise RuntimeError("two-stage needs the proposal heads: set by the detector (decoder.class_embed["
                               f"{self.decoder.num_layers}] or transformer.enc_out_class_embed)")
        return self.decoder.class_embed[self.decoder.num_layers], self.decoder.bbox_embed[self.decoder.num_layers]

    def encoder_proposals(self, memory: Tensor, mask_flatten: Tensor,
                          spatial_shapes_list: List[Tuple[int, int]]) -> Tuple[Tensor, Tensor, Tensor]:
        """Every token's detection: ``(output_memory [N,S,C] after enc_output + norm,
        class logits [N,S,K], box logits [N,S,4] = head delta + the token's proposal)``."""
        output_memory, output_proposals = gen_encoder_output_proposals(memory, mask_flatten, spatial_shapes_list)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        class_head, box_head = self.proposal_heads()
        return output_memory, class_head(output_memory), box_head(output_memory) + output_proposals

    def select_queries(self, memory: Tensor, mask_flatten: Tensor, spatial_shapes_list: List[Tuple[int, int]],
                       query_embed) -> Tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor], Optional[Tensor]]:
        """-> ``(tgt [N,Q,C], query_pos [N,Q,C] or None, reference_points [N,Q,2|4] (sigmoid),
        enc_logits, enc_coords_unact)`` (the last two None for single-stage). A successor may add
        a sixth entry, a dict of extra outputs for the detector's output dict (training only)."""
        bs, _, c = memory.shape
        anchors = self.decoder.derives_query_pos
        if self.two_stage:
            _, enc_logits, enc_coords_unact = self.encoder_proposals(memory, mask_flatten, spatial_shapes_list)
            k = num_selected(self.two_stage_num_proposals, enc_logits, 1)
            # the official code ranks by the first class: the encoder loss makes it a
            # class-agnostic objectness score (every target is relabelled 0)
            topk_proposals = torch.topk(enc_logits[..., 0], k, dim=1)[1]
            topk_coords_unact = gather_tokens(enc_coords_unact, topk_proposals).detach()
            pos_trans_out = self.pos_trans_norm(
                self.pos_trans(get_proposal_pos_embed(topk_coords_unact, c // 2).to(memory.dtype))
            )
            query_pos, tgt = torch.split(pos_trans_out, c, dim=2)
            if anchors:
                query_pos = None  # the anchor decoder makes positions from the boxes
            return tgt, query_pos, topk_coords_unact.sigmoid(), enc_logits, enc_coords_unact
        if query_embed is None:
            raise ValueError("single-stage queries need query_embed")
        if anchors:
            tgt_embed, refpoint_embed = query_embed
            tgt = tgt_embed.unsqueeze(0).expand(bs, -1, -1)
            reference_points = refpoint_embed.sigmoid().unsqueeze(0).expand(bs, -1, -1)
            return tgt, None, reference_points, None, None
        query_pos, tgt = torch.split(query_embed, c, dim=1)
        query_pos = query_pos.unsqueeze(0).expand(bs, -1, -1)
        tgt = tgt.unsqueeze(0).expand(bs, -1, -1)
        # the reference points stay float32 under autocast (see d2detr.layers.precision)
        return tgt, query_pos, geometry_forward(self.reference_points, query_pos).sigmoid(), None, None

    def matching_attn_mask(self, num_matching: int, num_denoising: int, denoising_mask: Optional[Tensor],
                           device) -> Optional[Tensor]:
        """The decoder's self-attention mask for ``num_denoising`` denoising queries followed by
        ``num_matching`` queries from :meth:`select_queries`: the denoising one here; DINO's
        transformer adds the hybrid branch's blocks."""
        return denoising_mask

    # --------------------------------------------------------------- forward
    def forward(
        self,
        srcs: List[Tensor],
        masks: List[Tensor],
        pos_embeds: List[Tensor],
        query_embed=None,
        denoising_queries=None,
    ) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
        """
        Args:
            srcs, masks, pos_embeds: per level ``[N, C, H, W]``, ``[N, H, W]`` (True = padding),
                ``[N, C, H, W]``.
            query_embed: the learned single-stage queries (see the class docstring).
            denoising_queries: extra query groups put before the matching queries, with the
                self-attention mask that keeps them apart: an object with ``tgt [N, P, C]``,
                ``reference_points [N, P, 4]`` (sigmoid) and ``attn_mask(num_matching) -> [P+Q, P+Q]``
                (see :class:`~d2detr.modeling.denoising.DenoisingQueries`). Needs an anchor decoder.
        """
        if len(srcs) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature levels, got {len(srcs)}")
        n_dec = self.num_decoder_only_levels
        (src_flatten, mask_flatten, lvl_pos_embed_flatten, spatial_shapes, level_start_index,
         valid_ratios, spatial_shapes_list) = flatten_multi_level(srcs[n_dec:], masks[n_dec:], pos_embeds[n_dec:],
                                                                  self.level_embed)
        memory = self.encode(src_flatten, spatial_shapes, level_start_index, valid_ratios,
                             lvl_pos_embed_flatten, mask_flatten, spatial_shapes_list)
        encoder_outputs = None
        if isinstance(memory, tuple):
            memory, encoder_outputs = memory
        selection = self.select_queries(memory, mask_flatten, spatial_shapes_list, query_embed)
        tgt, query_pos, reference_points, enc_logits, enc_coords_unact = selection[:5]
        if len(selection) > 5:  # extra training outputs of the selection (DINO's dense proposals)
            encoder_outputs = {**(encoder_outputs or {}), **selection[5]}
        self_attn_mask = None
        num_matching, num_denoising = tgt.shape[1], 0
        if denoising_queries is not None:
            if query_pos is not None:
                raise ValueError("extra query groups need a decoder that derives positions from anchors")
            self_attn_mask = denoising_queries.attn_mask(num_matching)
            num_denoising = denoising_queries.num_queries
            tgt = torch.cat([denoising_queries.tgt.to(tgt.dtype), tgt], 1)
            reference_points = torch.cat([denoising_queries.reference_points.to(reference_points.dtype),
                                          reference_points], 1)
        self_attn_mask = self.matching_attn_mask(num_matching, num_denoising, self_attn_mask, memory.device)
        if n_dec:
            memory, mask_flatten, spatial_shapes, level_start_index, valid_ratios = append_decoder_only_levels(
                memory, mask_flatten, spatial_shapes, valid_ratios, srcs[:n_dec], masks[:n_dec]
            )
        hs, inter_references = self.decoder(
            tgt, reference_points, memory, spatial_shapes, level_start_index, valid_ratios,
            query_pos=query_pos, memory_padding_mask=mask_flatten, self_attn_mask=self_attn_mask,
        )
        if encoder_outputs is not None:
            return hs, reference_points, inter_references, enc_logits, enc_coords_unact, encoder_outputs
        return hs, reference_points, inter_references, enc_logits, enc_coords_unact
