"""Focus-DETR's foreground token selector and its supervision.

Following the PyTorch release (huawei-noah/noah-research ``Focus-DETR/projects/focus_detr``:
``focus_detr_transformer.py`` ``MaskPredictor`` and the selector part of
``FOCUS_DETRTransformer.forward``, ``foreground_supervision.py``, ``two_stage_criterion.py``):

* every multi-scale token is scored from its two-stage ``enc_output`` features (the transformer's
  ``enc_output`` Linear + LayerNorm applied to neck feature + position, padded and out-of-range
  positions zeroed first);
* one predictor serves every level: LayerNorm, Linear, GELU, then the first half of the channels
  stays per token and the second half is replaced by its mean over the level, then a 3-layer MLP
  (GELU) to one logit;
* top-down modulation: the coarsest level is scored first; each finer level's features are
  modulated by the upsampled (bilinear, ``align_corners=True``) score map of the level above,
  ``f_l <- f_l + f_l * up(s_{l+1}) * alpha_k``, with one learnable ``alpha`` per step initialised
  ``U(-0.3, 0.3)``, before they are scored;
* foreground labels FCOS-style: a level-``l`` cell (centre ``(j * stride + stride // 2,
  i * stride + stride // 2)`` in input pixels) is foreground when it lies strictly inside a
  ground-truth box whose ``max(l, t, r, b)`` from that cell falls in the level's range
  ``(lo, hi]``; no centre sampling;
* loss: class-agnostic sigmoid focal loss (alpha 0.25, gamma 2) summed over every token of an
  image, divided by its number of foreground tokens (at least 1), averaged over the images.
"""
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2detr.modeling.losses import sigmoid_focal_loss
from d2detr.modeling.transformer import xavier_init_

__all__ = ["ForegroundScorePredictor", "ForegroundTokenSelector", "foreground_labels", "foreground_loss"]


class ForegroundScorePredictor(nn.Module):
    """One foreground logit per token from local and level-global features (the official
    ``MaskPredictor``): ``embed`` = LayerNorm, Linear(C, C), GELU; the second half of the channels
    is averaged over the tokens given (one level, padding included as in the official code);
    ``mlp`` = Linear(C, C/2), GELU, Linear(C/2, C/4), GELU, Linear(C/4, 1)."""

    def __init__(self, embed_dim: int = 256):
        super().__init__()
        if embed_dim % 4:
            raise ValueError(f"embed_dim must be divisible by 4, got {embed_dim}")
        self.embed_dim = embed_dim
        self.embed = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, embed_dim), nn.GELU())
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, embed_dim // 2),
            nn.GELU(),
            nn.Linear(embed_dim // 2, embed_dim // 4),
            nn.GELU(),
            nn.Linear(embed_dim // 4, 1),
        )

    def forward(self, tokens: Tensor) -> Tensor:
        """``tokens [N, T, C]`` (one level) -> logits ``[N, T]``."""
        z = self.embed(tokens)
        local, global_ = torch.split(z, self.embed_dim // 2, dim=-1)
        global_ = global_.mean(dim=1, keepdim=True).expand_as(local)
        return self.mlp(torch.cat([local, global_], -1)).squeeze(-1)


class ForegroundTokenSelector(nn.Module):
    """Scores every token of the flattened levels (fine to coarse), coarsest level first, each
    finer level modulated by the score map of the level above it (see the module docstring).

    Args:
        embed_dim: token width.
        num_levels: feature levels; ``num_levels - 1`` modulation weights ``alpha``.
        alpha_init_range: ``alpha ~ U(-r, r)`` (0.3 in the PyTorch release; the MindSpore port
            starts at 0).
    """

    def __init__(self, embed_dim: int = 256, num_levels: int = 4, alpha_init_range: float = 0.3):
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        self.num_levels = num_levels
        self.alpha_init_range = alpha_init_range
        self.predictor = ForegroundScorePredictor(embed_dim)
        self.alpha = nn.Parameter(torch.empty(num_levels - 1))
        self.reset_parameters()

    def reset_parameters(self):
        # the official transformer's Xavier pass covers the predictor; alpha keeps its uniform draw
        xavier_init_(self.predictor)
        nn.init.uniform_(self.alpha, -self.alpha_init_range, self.alpha_init_range)

    def forward(self, tokens: Tensor, spatial_shapes_list: Sequence[Tuple[int, int]]) -> Tensor:
        """``tokens [N, S, C]`` -> foreground logits ``[N, S]`` (padding not masked)."""
        if len(spatial_shapes_list) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} levels, got {len(spatial_shapes_list)}")
        N = tokens.shape[0]
        starts = [0]
        for h, w in spatial_shapes_list:
            starts.append(starts[-1] + h * w)
        scores: List[Tensor] = [tokens.new_empty(0)] * self.num_levels
        above = None  # score map [N, 1, h, w] of the coarser level
        for step, lvl in enumerate(reversed(range(self.num_levels))):
            h, w = spatial_shapes_list[lvl]
            feats = tokens[:, starts[lvl]:starts[lvl + 1]]
            if above is not None:
                up = F.interpolate(above, size=(h, w), mode="bilinear", align_corners=True)
                feats = feats + feats * up.flatten(2).transpose(1, 2) * self.alpha[step - 1]
            scores[lvl] = self.predictor(feats)
            above = scores[lvl].view(N, 1, h, w)
        return torch.cat(scores, 1)

    def extra_repr(self) -> str:
        return f"num_levels={self.num_levels}, alpha_init_range={self.alpha_init_range}"


def foreground_labels(
    boxes_xyxy: Tensor,
    spatial_shapes_list: Sequence[Tuple[int, int]],
    strides: Sequence[int],
    ranges: Sequence[Tuple[float, float]],
) -> Tensor:
    """FCOS-style foreground labels of one image's flattened tokens.

    Args:
        boxes_xyxy: ``[n, 4]`` ground-truth boxes in input pixels.
        spatial_shapes_list: ``(H, W)`` of every level, fine to coarse.
        strides: the pixel stride of every level (8, 16, 32, 64).
        ranges: ``(lo, hi)`` of every level: a cell is foreground for a box it lies strictly inside
            when ``lo < max(l, t, r, b) <= hi``. Ranges of adjacent levels may overlap.

    Returns ``[S]`` float, 1 on foreground tokens.
    """
    if not (len(spatial_shapes_list) == len(strides) == len(ranges)):
        raise ValueError(
            f"foreground labels: {len(spatial_shapes_list)} feature levels but {len(strides)} strides and "
            f"{len(ranges)} size ranges (set the criterion's foreground_strides / foreground_ranges)"
        )
    device = boxes_xyxy.device
    boxes = boxes_xyxy.float()
    labels = []
    for (h, w), stride, (lo, hi) in zip(spatial_shapes_list, strides, ranges):
        ys, xs = torch.meshgrid(
            torch.arange(h, device=device, dtype=torch.float32) * stride + stride // 2,
            torch.arange(w, device=device, dtype=torch.float32) * stride + stride // 2,
            indexing="ij",
        )
        x, y = xs.reshape(-1, 1), ys.reshape(-1, 1)  # [h*w, 1] against [n] boxes
        ltrb = torch.stack([x - boxes[:, 0], y - boxes[:, 1], boxes[:, 2] - x, boxes[:, 3] - y], -1)
        inside = ltrb.min(-1)[0] > 0
        reach = ltrb.max(-1)[0]
        labels.append((inside & (reach > lo) & (reach <= hi)).any(-1))
    return torch.cat(labels).float()


def foreground_loss(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """``logits``, ``labels`` ``[N, S]`` -> the mean over images of the sigmoid focal loss summed
    over an image's tokens and divided by its number of foreground tokens (at least 1)."""
    per_token = sigmoid_focal_loss(logits, labels, alpha, gamma, reduction="none")
    return (per_token.sum(1) / labels.sum(1).clamp(min=1)).mean()
