"""The AdaMixer decoder and what AdaMixer, RNNDet and DEQDet share.

AdaMixer (Gao et al., CVPR 2022; official code ``MCG-NJU/AdaMixer``, mmdet 2) is a query-based
detector without an encoder. A query is a content vector and a position ``(x, y, z, r)``:
the box centre in pixels, ``z = log2(sqrt(w h))`` and ``r = log2(h / w)``. Every decoder stage

1. lets the queries attend to each other (multi-head self-attention over ``content + PE(xyzr)``
   with the attention logits biased by ``tau_h * log(IoF + 1e-7)`` between the query boxes);
2. samples the feature pyramid at ``G x P_in`` **3D points** per query: offsets in x and y
   (relative to the box size) and in scale z, each point read from every level with Gaussian
   weights ``softmax_l(-(z_p - log2 stride_l)^2 / 2)``;
3. mixes the sampled ``P_in x C/G`` features of each group with parameters generated from the
   query: *adaptive channel mixing* (``C/G x C/G``) then *adaptive spatial mixing*
   (``P_out x P_in``), each followed by LayerNorm + ReLU, and projects the result back;
4. runs an FFN, then classification and box heads; the box head predicts
   ``(dx, dy, dz, dr)``: ``xy += dxy * 2^z``, ``zr += dzr``.

RNNDet and DEQDet (Wang et al., ICCV 2023; official code ``MCG-NJU/DEQDet``, mmdet 3) keep this
stage and only change how stages are chained: one initial stage plus one weight-tied refinement
stage applied repeatedly (:class:`WeightTiedAdaMixerBase`). Each method's own loop lives in its
project (``projects/adamixer``, ``projects/rnndet``, ``projects/deqdet``).

The 3D sampling runs through the native ``d2detr::ms_deform_attn`` op: every sampling point is
its own "query" with a single point per level, the ``G`` groups are the op's heads and the level
weights are its attention weights (:func:`sample_3d`), so it is one fused call on CPU and CUDA
and it traces and exports, where the official code loops over levels with ``F.grid_sample``.
"""
import copy
import math
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2detr.layers.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from d2detr.layers.ms_deform_attn import ms_deform_attn

from .meta_arch.detr_base import DETRBase

__all__ = [
    "boxes_to_xyzr",
    "xyzr_to_boxes",
    "refine_xyzr",
    "xyzr_position_embedding",
    "iof_log_bias",
    "FeaturePyramid",
    "flatten_pyramid",
    "level_weights",
    "sample_3d",
    "AdaptiveMixing",
    "AdaptiveSamplingMixing",
    "SamplingPointsRecorder",
    "AdaMixerStage",
    "QueryState",
    "AdaMixerQueryInit",
    "AdaMixerDetectorBase",
    "WeightTiedAdaMixerBase",
    "fresh_copy",
]


# ------------------------------------------------------------------------- box encodings
def boxes_to_xyzr(boxes: Tensor, eps: float = 1e-7) -> Tensor:
    """XYXY pixel boxes ``[..., 4]`` -> ``(x, y, z, r)``: centre, ``z = (log2 w + log2 h) / 2``,
    ``r = log2 h - log2 w``. ``|w|, |h|`` and ``eps`` as DEQDet's ``encode_xyzr`` (boxes jittered by
    its perturbation may come out flipped)."""
    xy = (boxes[..., 0:2] + boxes[..., 2:4]) * 0.5
    log_wh = torch.log2((boxes[..., 2:4] - boxes[..., 0:2]).abs() + eps)
    z = (log_wh[..., 0:1] + log_wh[..., 1:2]) * 0.5
    r = log_wh[..., 1:2] - log_wh[..., 0:1]
    return torch.cat([xy, z, r], dim=-1)


def xyzr_to_boxes(xyzr: Tensor) -> Tensor:
    """``(x, y, z, r)`` -> XYXY pixel boxes, ``w = 2^(z - r/2)``, ``h = 2^(z + r/2)``."""
    wh = _xyzr_wh(xyzr)
    xy = xyzr[..., 0:2]
    return torch.cat([xy - 0.5 * wh, xy + 0.5 * wh], dim=-1)


def _xyzr_wh(xyzr: Tensor) -> Tensor:
    z, r = xyzr[..., 2:3], xyzr[..., 3:4]
    return torch.pow(2.0, torch.cat([z - 0.5 * r, z + 0.5 * r], dim=-1))


def refine_xyzr(xyzr: Tensor, delta: Tensor) -> Tensor:
    """AdaMixer's box update: the centre moves by ``delta_xy * 2^z`` pixels, ``z`` and ``r`` add."""
    xy = xyzr[..., 0:2] + delta[..., 0:2] * torch.pow(2.0, xyzr[..., 2:3])
    return torch.cat([xy, xyzr[..., 2:4] + delta[..., 2:4]], dim=-1)


def xyzr_position_embedding(xyzr: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``[B, Q, dim]`` of ``(x/1000, y/1000, z, r)``, ``dim / 4`` features per
    coordinate with interleaved sin/cos (the official ``position_embedding``)."""
    if dim % 8 != 0:
        raise ValueError(f"the query width must be a multiple of 8 for the xyzr embedding, got {dim}")
    num_feats = dim // 4
    scaled = xyzr / xyzr.new_tensor([1000.0, 1000.0, 1.0, 1.0])
    i = torch.arange(num_feats, dtype=torch.float32, device=xyzr.device)
    dim_t = temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / num_feats)
    pos = scaled.float()[..., None] / dim_t  # [B, Q, 4, F]
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1)  # [B, Q, 4, F/2, 2]
    return pos.flatten(2).to(xyzr.dtype)


def iof_log_bias(boxes: Tensor, eps: float = 1e-7) -> Tensor:
    """``log(IoF + eps)`` ``[B, Q, Q]`` between the XYXY boxes ``[B, Q, 4]`` of one image's queries:
    ``IoF[i, j] = area(i & j) / area(i)`` (mmdet ``bbox_overlaps(mode="iof")``, area clamped to
    1e-6). Row ``i`` is the attending query, column ``j`` the attended one."""
    lt = torch.maximum(boxes[..., :, None, :2], boxes[..., None, :, :2])
    rb = torch.minimum(boxes[..., :, None, 2:], boxes[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    iof = overlap / area.clamp(min=1e-6)[..., :, None]
    return torch.log(iof + eps)


# ---------------------------------------------------------------------------- 3D sampling
class FeaturePyramid(NamedTuple):
    """The neck's levels flattened once per image batch for :func:`sample_3d`."""

    value: Tensor  # [B, S, G, C/G]: all levels, the channels split into the G sampling groups
    spatial_shapes: Tensor  # [L, 2] int64 (H, W)
    level_start_index: Tensor  # [L] int64
    mapping_size: Tensor  # [L, 2] (W * stride, H * stride): the padded image area a level covers
    log2_strides: Tensor  # [L]


def flatten_pyramid(features: Sequence[Tensor], strides: Sequence[int], num_groups: int) -> FeaturePyramid:
    """``features`` ``[B, C, H_l, W_l]`` (fine to coarse) with their strides -> :class:`FeaturePyramid`."""
    if len(features) != len(strides):
        raise ValueError(f"{len(features)} feature levels but {len(strides)} strides")
    B, C = features[0].shape[:2]
    if C % num_groups != 0:
        raise ValueError(f"feature channels ({C}) must be divisible by the sampling groups ({num_groups})")
    device = features[0].device
    # torch.full keeps the sizes dynamic under torch.jit.trace and torch.export
    shapes = torch.stack(
        [torch.stack([torch.full((), s, dtype=torch.long, device=device) for s in f.shape[-2:]]) for f in features]
    )
    value = torch.cat([f.flatten(2) for f in features], 2).transpose(1, 2)  # [B, S, C]
    level_start_index = torch.cat((shapes.new_zeros((1,)), shapes.prod(1).cumsum(0)[:-1]))
    stride_t = torch.tensor([float(s) for s in strides], device=device)
    mapping_size = shapes.flip(-1).to(torch.float32) * stride_t[:, None]
    return FeaturePyramid(
        value.reshape(B, value.shape[1], num_groups, C // num_groups),
        shapes,
        level_start_index,
        mapping_size,
        torch.log2(stride_t),
    )


def level_weights(z: Tensor, log2_strides: Tensor, tau: float = 2.0) -> Tensor:
    """Gaussian weights ``[..., L]`` of the pyramid levels for points at scale ``z [...]``:
    ``softmax_l(-(z - log2 stride_l)^2 / tau)``."""
    return torch.softmax(-((z[..., None] - log2_strides.to(z.dtype)) ** 2) / tau, dim=-1)


def sample_3d(pyramid: FeaturePyramid, xy: Tensor, z: Tensor, tau: float = 2.0) -> Tensor:
    """AdaMixer's 3D feature sampling.

    ``xy [B, Q, G, P, 2]`` pixel positions on the padded image, ``z [B, Q, G, P]`` their scale
    (log2 pixels). Each point is read bilinearly (zeros outside) from every level at
    ``xy / mapping_size_l`` and the levels are summed with :func:`level_weights`. Returns
    ``[B, Q, G, P, C/G]``. One ``ms_deform_attn`` call: ``Q * P`` op queries with one point per
    level, the groups as heads, the level weights as attention weights.
    """
    B, Q, G, P, _ = xy.shape
    L = pyramid.spatial_shapes.shape[0]
    value = pyramid.value
    if value.shape[2] != G:
        raise ValueError(f"the pyramid is split into {value.shape[2]} groups, the points into {G}")
    # [B, Q, G, P, 2] -> [B, Q*P, G, 1, 1, 2] / [L, 2] -> [B, Q*P, G, L, 1, 2]
    xy = xy.permute(0, 1, 3, 2, 4).reshape(B, Q * P, G, 1, 1, 2)
    locations = xy / pyramid.mapping_size.to(xy.dtype)[None, None, None, :, None, :]
    weights = level_weights(z, pyramid.log2_strides, tau).permute(0, 1, 3, 2, 4).reshape(B, Q * P, G, L, 1)
    # locations and weights keep their own (float32) dtype: the op accumulates in float32 and
    # returns value's dtype, so a float16 / bfloat16 pyramid does not round the pixel positions
    out = ms_deform_attn(
        value, pyramid.spatial_shapes, pyramid.level_start_index, locations.contiguous(), weights.contiguous()
    )  # [B, Q*P, G*D]
    return out.view(B, Q, P, G, -1).permute(0, 1, 3, 2, 4)


# ----------------------------------------------------------------------- adaptive mixing
class AdaptiveMixing(nn.Module):
    """Adaptive channel and spatial mixing of the sampled features, with parameters generated
    from the query by one linear layer (``parameter_generator``, zero-initialised weights).

    Per query and group: ``x [P_in, C_in]`` -> ``LN(ReLU(...))`` of ``x @ M`` (``M [C_in, C_out]``)
    -> ``LN(ReLU(...))`` of ``S @ x`` (``S [P_out, P_in]``), LayerNorm over both dimensions without
    affine parameters; the ``G x P_out x C_out`` result is projected back to the query width
    (``out_proj``) and added to the query.
    """

    def __init__(self, in_dim: int, in_points: int, num_groups: int, query_dim: int, out_dim: Optional[int] = None,
                 out_points: Optional[int] = None):
        super().__init__()
        out_dim = in_dim if out_dim is None else out_dim
        out_points = in_points if out_points is None else out_points
        if in_dim % num_groups or out_dim % num_groups:
            raise ValueError(f"in_dim ({in_dim}) and out_dim ({out_dim}) must be divisible by num_groups ({num_groups})")
        self.in_points, self.out_points, self.num_groups = in_points, out_points, num_groups
        self.eff_in_dim, self.eff_out_dim = in_dim // num_groups, out_dim // num_groups
        self.m_parameters = self.eff_in_dim * self.eff_out_dim
        self.s_parameters = in_points * out_points
        self.parameter_generator = nn.Linear(query_dim, num_groups * (self.m_parameters + self.s_parameters))
        self.out_proj = nn.Linear(self.eff_out_dim * out_points * num_groups, query_dim)

    def forward(self, sampled: Tensor, query: Tensor) -> Tensor:
        """``sampled [B, Q, G, P_in, C_in/G]``, ``query [B, Q, query_dim]`` -> ``[B, Q, query_dim]``."""
        B, Q, G, P, C = sampled.shape
        params = self.parameter_generator(query).reshape(B * Q, G, -1)
        channel_mix, spatial_mix = params.split([self.m_parameters, self.s_parameters], dim=-1)
        channel_mix = channel_mix.reshape(B * Q, G, self.eff_in_dim, self.eff_out_dim)
        spatial_mix = spatial_mix.reshape(B * Q, G, self.out_points, self.in_points)
        out = torch.matmul(sampled.reshape(B * Q, G, P, C), channel_mix)
        out = F.relu(F.layer_norm(out, out.shape[-2:]))
        out = torch.matmul(spatial_mix, out)
        out = F.relu(F.layer_norm(out, out.shape[-2:]))
        return query + self.out_proj(out.reshape(B, Q, -1))


class AdaptiveSamplingMixing(nn.Module):
    """3D sampling (offsets generated from the query) + :class:`AdaptiveMixing` + LayerNorm."""

    def __init__(self, content_dim: int = 256, feat_channels: int = 256, in_points: int = 32, out_points: int = 128,
                 num_groups: int = 4, tau: float = 2.0):
        super().__init__()
        self.in_points, self.out_points, self.num_groups, self.tau = in_points, out_points, num_groups, tau
        self.sampling_offset_generator = nn.Linear(content_dim, num_groups * in_points * 3)
        self.norm = nn.LayerNorm(content_dim)
        self.adaptive_mixing = AdaptiveMixing(
            feat_channels, in_points, num_groups, query_dim=content_dim, out_points=out_points
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Zero offset weights; offset biases on a regular grid in the box when ``P_in`` is a square
        (DEQDet's 64 points), else uniform in [-0.5, 0.5] (AdaMixer's 32); ``dz`` bias -1."""
        nn.init.zeros_(self.sampling_offset_generator.weight)
        bias = self.sampling_offset_generator.bias.view(self.num_groups, self.in_points, 3)
        side = int(math.isqrt(self.in_points))
        if side * side == self.in_points:
            grid = torch.linspace(-0.5, 0.5, side + 1)[:-1] + 0.5 / side
            # the official order: the first offset coordinate runs over the rows
            bias[:, :, 0] = grid.view(-1, 1).expand(side, side).reshape(-1)
            bias[:, :, 1] = grid.view(1, -1).expand(side, side).reshape(-1)
        else:
            nn.init.uniform_(bias[:, :, 0:2], -0.5, 0.5)
        bias[:, :, 2] = -1.0
        nn.init.zeros_(self.adaptive_mixing.parameter_generator.weight)

    def sampling_points(self, content: Tensor, xyzr: Tensor) -> Tuple[Tensor, Tensor]:
        """The 3D points of each query: ``xy [B, Q, G, P, 2]`` pixels ``(x, y) + offset * (w, h)`` and
        ``z [B, Q, G, P]`` = ``z + dz``."""
        B, Q, _ = content.shape
        offsets = self.sampling_offset_generator(content).view(B, Q, self.num_groups, self.in_points, 3)
        wh = _xyzr_wh(xyzr)[:, :, None, None, :]
        xy = xyzr[:, :, None, None, 0:2] + offsets[..., 0:2] * wh
        z = xyzr[:, :, None, None, 2] + offsets[..., 2]
        return xy, z

    def forward(self, pyramid: FeaturePyramid, content: Tensor, xyzr: Tensor) -> Tensor:
        xy, z = self.sampling_points(content, xyzr)
        sampled = sample_3d(pyramid, xy, z, self.tau)
        return self.norm(self.adaptive_mixing(sampled, content))


class SamplingPointsRecorder:
    """Context manager recording the 3D sampling points of every :class:`AdaptiveSamplingMixing`
    call of ``model`` (stage order; a weight-tied stage once per step), for pictures of where a
    query looks. ``records[i]`` holds ``xy [B, Q, G, P, 2]`` (pixels of the padded input), ``z [B, Q,
    G, P]``, ``level_weights [B, Q, G, P, L]``, ``box [B, Q, 4]`` (the XYXY box the points are
    placed in), ``strides`` and ``name`` (the module's)."""

    def __init__(self, model: nn.Module):
        self.modules = [(n, m) for n, m in model.named_modules() if isinstance(m, AdaptiveSamplingMixing)]
        self.records: List[Dict] = []
        self._handles = []

    def __enter__(self):
        for name, module in self.modules:
            def hook(mod, args, name=name):
                pyramid, content, xyzr = args
                xy, z = mod.sampling_points(content, xyzr)
                self.records.append({
                    "name": name, "xy": xy.detach(), "z": z.detach(), "box": xyzr_to_boxes(xyzr).detach(),
                    "level_weights": level_weights(z, pyramid.log2_strides, mod.tau).detach(),
                    "strides": torch.pow(2.0, pyramid.log2_strides).round().long().tolist(),
                })
            self._handles.append(module.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False


# --------------------------------------------------------------------------------- stage
class QueryState(NamedTuple):
    """What one stage hands to the next: positions, contents, their boxes and class logits."""

    xyzr: Tensor  # [B, Q, 4]
    content: Tensor  # [B, Q, C]
    boxes: Tensor  # [B, Q, 4] XYXY pixels (the boxes the next stage's IoF bias uses)
    logits: Optional[Tensor] = None  # [B, Q, K]


def _fc_relu_stack(dim: int, num: int) -> nn.Sequential:
    layers: List[nn.Module] = []
    for _ in range(num):
        layers += [nn.Linear(dim, dim), nn.LayerNorm(dim), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class AdaMixerStage(nn.Module):
    """One AdaMixer decoder stage (``AdaMixerDecoderStage`` / DEQDet's ``AdaMixerHead``).

    Args:
        num_classes: sigmoid classes of ``fc_cls``.
        content_dim: query width (256); ``feat_channels``: neck width (256).
        num_heads: self-attention heads (8); ``ffn_dim``: FFN width (2048).
        in_points, out_points, num_groups: ``P_in`` (AdaMixer 32, DEQDet 64), ``P_out`` (128),
            ``G`` (4) of the sampling and mixing.
        num_cls_fcs, num_reg_fcs: Linear + LayerNorm + ReLU blocks before ``fc_cls`` / ``fc_reg`` (1, 1).
        dropout: of the attention and the FFN (0.0 in every official config).
        tau: temperature of the level weights (2.0).
    """

    def __init__(self, num_classes: int = 80, content_dim: int = 256, feat_channels: int = 256, num_heads: int = 8,
                 ffn_dim: int = 2048, in_points: int = 32, out_points: int = 128, num_groups: int = 4,
                 num_cls_fcs: int = 1, num_reg_fcs: int = 1, dropout: float = 0.0, tau: float = 2.0):
        super().__init__()
        if content_dim % num_heads:
            raise ValueError(f"content_dim ({content_dim}) must be divisible by num_heads ({num_heads})")
        self.num_classes, self.content_dim, self.num_heads = num_classes, content_dim, num_heads
        self.attention = nn.MultiheadAttention(content_dim, num_heads, dropout=dropout, batch_first=True)
        self.attention_norm = nn.LayerNorm(content_dim)
        self.sampling_mixing = AdaptiveSamplingMixing(content_dim, feat_channels, in_points, out_points, num_groups, tau)
        self.ffn = nn.Sequential(
            nn.Linear(content_dim, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(ffn_dim, content_dim), nn.Dropout(dropout),
        )
        self.ffn_norm = nn.LayerNorm(content_dim)
        self.cls_fcs = _fc_relu_stack(content_dim, num_cls_fcs)
        self.fc_cls = nn.Linear(content_dim, num_classes)
        self.reg_fcs = _fc_relu_stack(content_dim, num_reg_fcs)
        self.fc_reg = nn.Linear(content_dim, 4)
        self.iof_tau = nn.Parameter(torch.empty(num_heads))
        self.reset_parameters()

    @property
    def num_groups(self) -> int:
        return self.sampling_mixing.num_groups

    @torch.no_grad()
    def reset_parameters(self, prior_prob: float = 0.01) -> None:
        """The official initialisation: every Linear (the attention's output projection included)
        re-initialised by PyTorch, then Xavier-uniform weights; the attention's input projection
        Xavier-uniform with zero bias; the focal prior on ``fc_cls``; zero ``fc_reg``;
        ``iof_tau ~ U(0, 4)``; then the sampling offsets and the zero parameter generator."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()
                nn.init.xavier_uniform_(m.weight)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        nn.init.xavier_uniform_(self.attention.in_proj_weight)
        nn.init.zeros_(self.attention.in_proj_bias)
        nn.init.constant_(self.fc_cls.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.zeros_(self.fc_reg.weight)
        nn.init.zeros_(self.fc_reg.bias)
        nn.init.uniform_(self.iof_tau, 0.0, 4.0)
        self.sampling_mixing.reset_parameters()

    def forward(self, pyramid: FeaturePyramid, state: QueryState) -> QueryState:
        """One refinement of ``state``; the input position is detached (boxes are not
        back-propagated through between stages, as in the official code)."""
        xyzr, content = state.xyzr.detach(), state.content
        B, Q, _ = content.shape
        with torch.no_grad():
            bias = iof_log_bias(state.boxes.detach().float())  # [B, Q, Q]
            pe = xyzr_position_embedding(xyzr, self.content_dim).to(content.dtype)
        attn_bias = (bias[:, None] * self.iof_tau.view(1, -1, 1, 1)).flatten(0, 1).to(content.dtype)
        x = content + pe
        x = self.attention_norm(x + self.attention(x, x, x, attn_mask=attn_bias, need_weights=False)[0])
        x = self.sampling_mixing(pyramid, x, xyzr)
        x = self.ffn_norm(x + self.ffn(x))
        logits = self.fc_cls(self.cls_fcs(x))
        new_xyzr = refine_xyzr(xyzr, self.fc_reg(self.reg_fcs(x)).to(xyzr.dtype))
        return QueryState(new_xyzr, x, xyzr_to_boxes(new_xyzr), logits)


class AdaMixerQueryInit(nn.Module):
    """The initial queries: contents from an embedding through LayerNorm (no affine parameters),
    positions covering the whole (unpadded) image, not learned (the official ``init_proposal_bboxes``
    embedding never receives a gradient; here it is the buffer ``init_boxes``, normalised cxcywh).
    """

    def __init__(self, num_queries: int = 100, content_dim: int = 256):
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"num_queries must be positive, got {num_queries}")
        self.num_queries, self.content_dim = num_queries, content_dim
        self.content = nn.Embedding(num_queries, content_dim)
        self.register_buffer("init_boxes", torch.tensor([[0.5, 0.5, 1.0, 1.0]]).repeat(num_queries, 1))

    def forward(self, image_whwh: Tensor) -> QueryState:
        """``image_whwh [B, 4]`` (w, h, w, h of each unpadded image) -> the initial :class:`QueryState`."""
        B = image_whwh.shape[0]
        boxes = box_cxcywh_to_xyxy(self.init_boxes)[None] * image_whwh[:, None, :]
        content = F.layer_norm(self.content.weight, (self.content_dim,))[None].expand(B, -1, -1)
        return QueryState(boxes_to_xyzr(boxes), content, boxes)


# ------------------------------------------------------------------------- meta-arch base
class AdaMixerDetectorBase(DETRBase):
    """Backbone -> neck -> :class:`FeaturePyramid`, the initial queries, and the outputs of the
    stages in DETRBase's contract (``pred_boxes`` normalised cxcywh of the unpadded image).
    Subclasses implement how stages are chained (``forward_features``).

    Training losses: when ``outputs`` holds ``"loss_sets"`` (a list of ``(suffix, outputs)``),
    every set is matched and its losses are keyed with its suffix (``loss_class_init``, ...);
    otherwise the usual ``aux_outputs``.

    Args:
        backbone, neck: the neck's ``output_shape()`` gives the level strides.
        queries: :class:`AdaMixerQueryInit`; ``num_queries`` must equal its ``num_queries``.
        criterion: a ``SetCriterion`` with focal classification and ``l1_box_format="xyxy"``
            (mmdet's L1 loss on decoded XYXY boxes; GIoU is invariant to the per-axis scaling, so
            on normalised boxes it equals mmdet's pixel GIoU), None for inference only.
        num_classes, select_box_nums_for_evaluation, pixel_mean, pixel_std, size_divisibility,
            input_format: see :class:`DETRBase` (mmdet pads to 32).
    """

    def __init__(self, *, backbone: nn.Module, neck: nn.Module, queries: AdaMixerQueryInit,
                 criterion: Optional[nn.Module] = None, num_classes: int = 80, num_queries: Optional[int] = None,
                 select_box_nums_for_evaluation: int = 100, pixel_mean=(123.675, 116.280, 103.530),
                 pixel_std=(58.395, 57.120, 57.375), size_divisibility: int = 32, input_format: str = "RGB"):
        super().__init__(
            backbone=backbone, criterion=criterion, num_classes=num_classes, pixel_mean=pixel_mean,
            pixel_std=pixel_std, select_box_nums_for_evaluation=select_box_nums_for_evaluation, use_focal=True,
            size_divisibility=size_divisibility, input_format=input_format,
        )
        if num_queries is not None and num_queries != queries.num_queries:
            raise ValueError(f"num_queries ({num_queries}) != queries.num_queries ({queries.num_queries})")
        self.neck = neck
        self.queries = queries
        self.num_queries = queries.num_queries
        self.strides = [int(s.stride) for s in neck.output_shape()]

    def check_stage(self, stage: AdaMixerStage) -> None:
        """The stage must fit the neck (width) and the classes; raises ValueError naming the mismatch."""
        width = self.neck.output_shape()[0].channels
        feat = stage.sampling_mixing.adaptive_mixing.eff_in_dim * stage.num_groups
        if feat != width:
            raise ValueError(f"the stage samples {feat}-channel features, the neck gives {width}")
        if stage.content_dim != self.queries.content_dim:
            raise ValueError(f"stage width {stage.content_dim} != query width {self.queries.content_dim}")
        if stage.num_classes != self.num_classes:
            raise ValueError(f"stage has {stage.num_classes} classes, the model {self.num_classes}")

    @staticmethod
    def image_whwh(masks: Tensor) -> Tensor:
        """``[B, 4]`` (w, h, w, h) of each unpadded image, from the padding mask (tensor ops only,
        so traced and exported graphs stay valid for other sizes)."""
        valid = ~masks
        h = valid[:, :, 0].sum(1)
        w = valid[:, 0, :].sum(1)
        return torch.stack([w, h, w, h], 1).float()

    def pyramid(self, images, masks: Tensor, num_groups: int) -> FeaturePyramid:
        x = images.tensor if hasattr(images, "tensor") else images
        return flatten_pyramid(self.neck(self.backbone(x)), self.strides, num_groups)

    def stage_outputs(self, state: QueryState, whwh: Tensor) -> Dict[str, Tensor]:
        """A stage's ``{"pred_logits", "pred_boxes"}`` (boxes normalised cxcywh by the image size)."""
        return {"pred_logits": state.logits, "pred_boxes": box_xyxy_to_cxcywh(state.boxes / whwh[:, None, :])}

    def compute_losses(self, outputs: Dict, targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        sets = outputs.get("loss_sets")
        if sets is None:
            return super().compute_losses(outputs, targets)
        if self.criterion is None:
            raise RuntimeError(f"{type(self).__name__} was built without a criterion: cannot train")
        num_boxes = self.criterion.get_num_boxes(targets, outputs["pred_logits"].device)
        losses: Dict[str, Tensor] = {}
        for suffix, out in sets:
            losses.update(self.criterion.compute_set_losses(out, targets, num_boxes, suffix))
        return losses


def fresh_copy(stage: AdaMixerStage) -> AdaMixerStage:
    """An independently initialised copy of ``stage`` (the official code builds every stage anew)."""
    new = copy.deepcopy(stage)
    new.reset_parameters()
    return new


class WeightTiedAdaMixerBase(AdaMixerDetectorBase):
    """One initial AdaMixer stage and one weight-tied refinement stage (RNNDet, DEQDet).

    Inference: the initial stage, then ``test_refinement_steps`` applications of the refinement
    stage; the last step's predictions are the detections (change the number of steps with
    ``model.test_refinement_steps=N``). Subclasses define training (``training_outputs``).

    Args:
        stage: the :class:`AdaMixerStage` config; ``init_stage`` and ``refine_stage`` are two
            independently initialised copies.
        test_refinement_steps: refinement steps at inference.
        checkpoint_refinement: run the refinement steps that carry gradients under activation
            checkpointing (``torch.utils.checkpoint``): their activations are recomputed during the
            backward pass instead of kept, so memory grows with the number of supervised steps only
            by their small inputs. Same losses and gradients; one extra forward per such step.
        others: see :class:`AdaMixerDetectorBase`.
    """

    def __init__(self, *, stage: AdaMixerStage, test_refinement_steps: int, checkpoint_refinement: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        if test_refinement_steps < 0:
            raise ValueError(f"test_refinement_steps must be >= 0, got {test_refinement_steps}")
        self.check_stage(stage)
        self.init_stage = fresh_copy(stage)
        self.refine_stage = fresh_copy(stage)
        self.test_refinement_steps = int(test_refinement_steps)
        self.checkpoint_refinement = bool(checkpoint_refinement)

    def refine(self, pyramid: FeaturePyramid, state: QueryState) -> QueryState:
        """One application of the tied refinement stage (checkpointed when asked and grads flow)."""
        if self.checkpoint_refinement and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return QueryState(*checkpoint(self.refine_stage, pyramid, state, use_reentrant=False))
        return self.refine_stage(pyramid, state)

    def training_outputs(self, pyramid: FeaturePyramid, first: QueryState, whwh: Tensor) -> Dict:
        raise NotImplementedError

    @torch.no_grad()
    def outputs_per_step(self, images, masks: Tensor, max_steps: int) -> Iterator[Tuple[int, Dict[str, Tensor]]]:
        """Inference outputs after 0, 1, ..., ``max_steps`` refinement steps, in one pass (what
        ``forward_features`` returns with ``test_refinement_steps = n``, for every ``n``)."""
        whwh = self.image_whwh(masks)
        pyramid = self.pyramid(images, masks, self.init_stage.num_groups)
        state = self.init_stage(pyramid, self.queries(whwh))
        yield 0, self.stage_outputs(state, whwh)
        for n in range(1, max_steps + 1):
            state = self.refine_stage(pyramid, state)
            yield n, self.stage_outputs(state, whwh)

    def forward_features(self, images, masks: Tensor) -> Dict:
        whwh = self.image_whwh(masks)
        pyramid = self.pyramid(images, masks, self.init_stage.num_groups)
        first = self.init_stage(pyramid, self.queries(whwh))
        if self.training:
            return self.training_outputs(pyramid, first, whwh)
        state = first
        for _ in range(self.test_refinement_steps):
            state = self.refine_stage(pyramid, state)
        return self.stage_outputs(state, whwh)
