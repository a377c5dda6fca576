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
from d2detr.layers.ms_deform_attn import MultiScaleDeformableAttention

from .transformer import _clones, get_activation_fn, with_pos_embed, xavier_init_

__all__ = [
    "DeformableTransformerEncoderLayer",
    "DeformableTransformerDecoderLayer",
    "DeformableTransformerEncoder",
    "DeformableTransformerDecoder",
    "flatten_multi_level",
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
    ):
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(embed_dim, num_heads, num_levels, num_points)
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
    ):
        super().__init__()
        # cross attention
        self.cross_attn = MultiScaleDeformableAttention(embed_dim, num_heads, num_levels, num_points)
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

    With ``self.bbox_embed`` (a ModuleList of per-layer box heads, set by the detector) each layer
    refines the reference points: ``sigmoid(bbox_embed[i](hs) + inverse_sigmoid(ref))``, detached
    before the next layer (iterative bounding box refinement). ``self.class_embed`` is only a
    place to hang the two-stage heads; the decoder itself does not use it.

    Returns ``(hs [num_layers, N, Q, C], references [num_layers, N, Q, 2|4])`` where
    ``references[i]`` are the reference points *after* layer ``i`` (the inputs of layer ``i+1``);
    with ``return_intermediate=False`` only the last layer, with a leading dim of 1.
    """

    def __init__(self, decoder_layer: nn.Module, num_layers: int, return_intermediate: bool = True):
        super().__init__()
        self.layers = _clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.return_intermediate = return_intermediate
        self.bbox_embed: Optional[nn.ModuleList] = None
        self.class_embed: Optional[nn.ModuleList] = None

    @staticmethod
    def scale_reference_points(reference_points: Tensor, valid_ratios: Tensor) -> Tensor:
        """``[N, Q, 2|4]`` relative to the valid area -> ``[N, Q, L, 2|4]`` relative to each padded level."""
        if reference_points.shape[-1] == 4:
            return reference_points[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
        if reference_points.shape[-1] == 2:
            return reference_points[:, :, None] * valid_ratios[:, None]
        raise ValueError(f"reference_points must end in 2 or 4, got {tuple(reference_points.shape)}")

    @staticmethod
    def refine_reference_points(delta: Tensor, reference_points: Tensor) -> Tensor:
        """Box refinement in logit space; 2-d references become 4-d boxes."""
        if reference_points.shape[-1] == 4:
            return (delta + inverse_sigmoid(reference_points)).sigmoid()
        return torch.cat([delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1).sigmoid()

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
                query_pos,
                reference_points_input,
                memory,
                spatial_shapes,
                level_start_index,
                memory_padding_mask,
                self_attn_mask,
            )
            if self.bbox_embed is not None:
                new_reference_points = self.refine_reference_points(self.bbox_embed[lid](output), reference_points)
                reference_points = new_reference_points.detach()
            if self.return_intermediate:
                intermediate.append(output)
                intermediate_reference_points.append(reference_points)
        if self.return_intermediate:
            return torch.stack(intermediate), torch.stack(intermediate_reference_points)
        return output[None], reference_points[None]


def get_valid_ratio(mask: Tensor) -> Tensor:
    """``mask[N, H, W]`` (True = padding) -> ``[N, 2]`` valid (width, height) fractions."""
    _, H, W = mask.shape
    valid_H = torch.sum(~mask[:, :, 0], 1)
    valid_W = torch.sum(~mask[:, 0, :], 1)
    return torch.stack([valid_W.float() / W, valid_H.float() / H], -1)


def flatten_multi_level(
    srcs: Sequence[Tensor],
    masks: Sequence[Tensor],
    pos_embeds: Sequence[Tensor],
    level_embed: Optional[Tensor] = None,
):
    """Flattens per-level ``[N, C, H, W]`` features, ``[N, H, W]`` masks and positions.

    Returns ``(src_flatten [N,S,C], mask_flatten [N,S], lvl_pos_embed_flatten [N,S,C],
    spatial_shapes [L,2] int64, level_start_index [L] int64, valid_ratios [N,L,2],
    spatial_shapes_list)``; ``level_embed[l]`` is added to level ``l``'s position embedding.
    """
    src_flatten, mask_flatten, lvl_pos_embed_flatten = [], [], []
    spatial_shapes_list: List[Tuple[int, int]] = []
    for lvl, (src, mask, pos_embed) in enumerate(zip(srcs, masks, pos_embeds)):
        h, w = src.shape[-2:]
        spatial_shapes_list.append((h, w))
        src_flatten.append(src.flatten(2).transpose(1, 2))
        mask_flatten.append(mask.flatten(1))
        pos_embed = pos_embed.flatten(2).transpose(1, 2)
        if level_embed is not None:
            pos_embed = pos_embed + level_embed[lvl].view(1, 1, -1)
        lvl_pos_embed_flatten.append(pos_embed)
    src_flatten = torch.cat(src_flatten, 1)
    mask_flatten = torch.cat(mask_flatten, 1)
    lvl_pos_embed_flatten = torch.cat(lvl_pos_embed_flatten, 1)
    # torch.full keeps the sizes dynamic under torch.jit.trace and torch.export (torch.as_tensor
    # would record them as constants / specialise them)
    spatial_shapes = torch.stack(
        [torch.stack([torch.full((), s, dtype=torch.long, device=src_flatten.device) for s in hw]) for hw in spatial_shapes_list]
    )
    level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
    valid_ratios = torch.stack([get_valid_ratio(m) for m in masks], 1).to(src_flatten.dtype)
    return (
        src_flatten,
        mask_flatten,
        lvl_pos_embed_flatten,
        spatial_shapes,
        level_start_index,
        valid_ratios,
        spatial_shapes_list,
    )


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
    proposals = []
    _cur = 0
    for lvl, (H, W) in enumerate(spatial_shapes_list):
        mask_flatten_ = memory_padding_mask[:, _cur : (_cur + H * W)].view(N, H, W, 1)
        valid_H = torch.sum(~mask_flatten_[:, :, 0, 0], 1)
        valid_W = torch.sum(~mask_flatten_[:, 0, :, 0], 1)
        grid_y, grid_x = torch.meshgrid(
            torch.arange(H, dtype=memory.dtype, device=memory.device),  # == linspace(0, H - 1, H)
            torch.arange(W, dtype=memory.dtype, device=memory.device),
            indexing="ij",
        )
        grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
        scale = torch.cat([valid_W.unsqueeze(-1), valid_H.unsqueeze(-1)], 1).view(N, 1, 1, 2).to(memory.dtype)
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
