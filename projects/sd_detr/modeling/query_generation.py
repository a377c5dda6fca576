"""SD-DETR's queries: mini-detector anchors and task-aware query generation.

* :class:`MiniDetector` -- a dense, class-agnostic detection head on the encoder memory whose
  top-scoring boxes become the decoder's anchor boxes ``R_box`` (the paper's "mini-detector";
  its design is not described there, so it is two-stage Deformable DETR's encoder head on the
  single C5 level: one proposal per token, refined by a 3-layer MLP, trained with the
  Hungarian-matched class-agnostic encoder loss).
* :func:`roi_align` -- RoIAlign (``aligned=True``) in plain PyTorch (``grid_sample``), so the
  exported graph needs no torchvision op library.
* :class:`DiscriminativePoints` -- SAM-DETR's semantic-aligner point predictor (1x1 conv + MLP on
  the 7x7 RoI features, ``tanh`` offsets in the box), one per task branch; the features at the
  points are sampled bilinearly and averaged into the branch's content query, the mean offset
  gives its reference point.
"""
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2detr.layers import MLP
from d2detr.layers.dynamic_shapes import num_selected
from d2detr.modeling.deformable_transformer import gen_encoder_output_proposals
from d2detr.modeling.meta_arch.detr_base import init_focal_heads

__all__ = ["MiniDetector", "DiscriminativePoints", "roi_align", "anchors_to_feature_boxes"]


def roi_align(features: Tensor, boxes: Tensor, output_size: int = 7, sampling_ratio: int = 2) -> Tensor:
    """RoIAlign of ``features [B,C,H,W]`` at ``boxes [B,Q,4]`` (x0, y0, x1, y1) in feature-map
    cells (continuous: cell ``i`` spans ``[i, i+1]``) -> ``[B,Q,C,S,S]``, ``S = output_size``.

    Equals ``torchvision.ops.roi_align(..., aligned=True, sampling_ratio=sampling_ratio)`` for
    boxes within half a cell of the map (tested); further out torchvision returns zeros where this
    repeats the border. Each bin averages ``sampling_ratio**2`` bilinear samples.
    """
    if features.dim() != 4 or boxes.dim() != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != features.shape[0]:
        raise ValueError(f"roi_align expects features [B,C,H,W] and boxes [B,Q,4], got "
                         f"{tuple(features.shape)} and {tuple(boxes.shape)}")
    B, C, H, W = features.shape
    Q = boxes.shape[1]
    n = output_size * sampling_ratio
    t = (torch.arange(n, dtype=boxes.dtype, device=boxes.device) + 0.5) / n  # sample centres in [0, 1]
    xs = boxes[..., 0:1] + (boxes[..., 2:3] - boxes[..., 0:1]) * t  # [B,Q,n]
    ys = boxes[..., 1:2] + (boxes[..., 3:4] - boxes[..., 1:2]) * t
    # grid_sample(align_corners=False) reads continuous coordinate c at 2c/size - 1
    gx = (2 * xs / W - 1)[:, :, None, :].expand(B, Q, n, n)
    gy = (2 * ys / H - 1)[:, :, :, None].expand(B, Q, n, n)
    grid = torch.stack([gx, gy], -1).reshape(B, Q * n, n, 2).to(features.dtype)
    samples = F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)
    samples = samples.view(B, C, Q, output_size, sampling_ratio, output_size, sampling_ratio).mean((4, 6))
    return samples.permute(0, 2, 1, 3, 4)


def anchors_to_feature_boxes(anchors: Tensor, mask: Tensor) -> Tensor:
    """``anchors [B,Q,4]`` (cx, cy, w, h) normalised to the unpadded image -> (x0, y0, x1, y1) in
    cells of the padded feature map whose padding ``mask [B,H,W]`` (True = padding) is given."""
    valid_h = (~mask[:, :, 0]).sum(1).to(anchors.dtype)
    valid_w = (~mask[:, 0, :]).sum(1).to(anchors.dtype)
    scale = torch.stack([valid_w, valid_h, valid_w, valid_h], -1)[:, None, :]
    cxcy, wh = anchors[..., :2], anchors[..., 2:]
    return torch.cat([cxcy - 0.5 * wh, cxcy + 0.5 * wh], -1) * scale


class MiniDetector(nn.Module):
    """Class-agnostic dense detector on the encoder memory; its top-``k`` boxes are the anchors.

    Every memory token proposes a box centred on its cell with width = height = ``anchor_scale``
    (0.2: the size two-stage Deformable DETR gives its stride-32 level, ``0.05 * 2**2``);
    ``enc_output`` + ``enc_output_norm`` (Linear + LayerNorm), a 1-logit ``class_embed`` and a
    3-layer ``bbox_embed`` refine it, as two-stage Deformable DETR's encoder head.

    ``forward(memory [B,S,C], mask [B,S] (True = padding), spatial_shape (H, W), k)`` returns
    ``(anchors [B,k',4] (cx, cy, w, h) in [0, 1], detached; logits [B,S,1]; boxes [B,S,4])``
    with ``k' = min(k, S)``. Padding tokens and proposals outside (0.01, 0.99) never become anchors.
    """

    def __init__(self, d_model: int = 256, anchor_scale: float = 0.2, prior_prob: float = 0.01):
        super().__init__()
        if not 0.0 < anchor_scale < 1.0:
            raise ValueError(f"anchor_scale must be in (0, 1), got {anchor_scale}")
        self.anchor_scale = anchor_scale
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self.class_embed = nn.Linear(d_model, 1)
        self.bbox_embed = MLP(d_model, d_model, 4, 3)
        self.prior_prob = prior_prob
        self.reset_heads()

    def reset_heads(self) -> None:
        """Focal prior on the score, zero last box layer: proposals start as the grid anchors."""
        init_focal_heads(self.class_embed, self.bbox_embed, self.prior_prob)

    def forward(self, memory: Tensor, mask: Tensor, spatial_shape: Tuple[int, int], k: int):
        output_memory, proposals = gen_encoder_output_proposals(
            memory, mask, [spatial_shape], base_scale=self.anchor_scale
        )
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        logits = self.class_embed(output_memory)
        coords_unact = self.bbox_embed(output_memory) + proposals
        score = logits[..., 0].masked_fill(~torch.isfinite(proposals).all(-1), float("-inf"))
        topk = torch.topk(score, num_selected(k, score, 1), dim=1).indices  # dynamic when exported
        anchors = torch.gather(coords_unact, 1, topk.unsqueeze(-1).expand(-1, -1, 4)).detach().sigmoid()
        return anchors, logits, coords_unact.sigmoid()


class DiscriminativePoints(nn.Module):
    """SAM-DETR's point predictor for one task branch.

    RoI features ``[B,Q,C,S,S]`` -> ``point_conv`` (1x1 conv to C/4, ReLU) -> ``point_mlp``
    (C/4·S² -> C -> 2C -> 2C -> 2·num_points with ReLU between; SAM-DETR's 256/512/512 at C = 256;
    last bias zero) -> ``tanh`` offsets
    ``[B,Q,P,2]`` in (-1, 1) relative to the box (x, y). The content query is the mean of the RoI
    features sampled bilinearly at the points (``grid_sample``, zeros outside, as SAM-DETR).

    ``forward(roi)`` returns ``(content [B,Q,C], offsets [B,Q,P,2])``.
    """

    def __init__(self, d_model: int = 256, num_points: int = 8, roi_size: int = 7):
        super().__init__()
        if num_points < 1:
            raise ValueError(f"num_points must be >= 1, got {num_points}")
        self.num_points = num_points
        self.roi_size = roi_size
        reduced = d_model // 4
        self.point_conv = nn.Sequential(nn.Conv2d(d_model, reduced, kernel_size=1), nn.ReLU())
        widths = [reduced * roi_size * roi_size, d_model, 2 * d_model, 2 * d_model]
        layers: List[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], 2 * num_points))
        self.point_mlp = nn.Sequential(*layers)
        # SAM-DETR zero-initialises this layer, but its transformer's Xavier reset then redraws
        # the weight; SDDetrTransformer does the same, so only the zero bias remains.
        nn.init.zeros_(self.point_mlp[-1].bias)

    def forward(self, roi: Tensor) -> Tuple[Tensor, Tensor]:
        B, Q, C, S, _ = roi.shape
        if S != self.roi_size:
            raise ValueError(f"RoI features are {S}x{S}, the point predictor expects {self.roi_size}x{self.roi_size}")
        flat = roi.reshape(B * Q, C, S, S)
        offsets = self.point_mlp(self.point_conv(flat).flatten(1)).view(B * Q, 1, self.num_points, 2).tanh()
        sampled = F.grid_sample(flat, offsets, mode="bilinear", padding_mode="zeros", align_corners=False)
        content = sampled.view(B, Q, C, self.num_points).mean(-1)
        return content, offsets.view(B, Q, self.num_points, 2)
