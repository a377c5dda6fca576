"""Position encodings for 2D feature maps (DETR / Deformable DETR)."""
import math
import torch
from torch import Tensor, nn

__all__ = ["PositionEmbeddingSine", "PositionEmbeddingLearned"]


class PositionEmbeddingSine(nn.Module):
    """The sine/cosine embedding of "Attention is all you need", generalised to images.

    ``forward(mask)`` takes ``mask[B,H,W]`` (True = padding) and returns
    ``[B, 2*num_pos_feats, H, W]``: first the y half, then the x half, each
    interleaving sin (even) and cos (odd) as in DETR.

    With ``normalize=True`` the cumulative coordinates are mapped to
    ``(cumsum + offset) / (last + eps) * scale``; DETR uses ``offset=0``,
    Deformable DETR / DINO ``offset=-0.5``.
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: int = 10000,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        eps: float = 1e-6,
        offset: float = 0.0,
    ):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.eps = eps
        self.offset = offset

    def forward(self, mask: Tensor) -> Tensor:
        assert mask is not None and mask.dim() == 3, "mask must be [B,H,W]"
        not_mask = (~mask).to(torch.float32)
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        if self.normalize:
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)

        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        B, H, W = mask.shape
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
            f"normalize={self.normalize}, scale={self.scale:.4f}, offset={self.offset}"
        )


class PositionEmbeddingLearned(nn.Module):
    """Absolute learned embedding (DETR's ``PositionEmbeddingLearned``), up to 50x50 cells.

    ``forward(mask[B,H,W]) -> [B, 2*num_pos_feats, H, W]`` (x half first, as in DETR).
    """

    def __init__(self, num_pos_feats: int = 256, num_embeddings: int = 50):
        super().__init__()
        self.row_embed = nn.Embedding(num_embeddings, num_pos_feats)
        self.col_embed = nn.Embedding(num_embeddings, num_pos_feats)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, mask: Tensor) -> Tensor:
        B, h, w = mask.shape
        if h > self.row_embed.num_embeddings or w > self.col_embed.num_embeddings:
            raise ValueError(
                f"feature map {h}x{w} exceeds learned embedding size {self.row_embed.num_embeddings}"
            )
        i = torch.arange(w, device=mask.device)
        j = torch.arange(h, device=mask.device)
        x_emb = self.col_embed(i)
        y_emb = self.row_embed(j)
        pos = torch.cat(
            [x_emb.unsqueeze(0).repeat(h, 1, 1), y_emb.unsqueeze(1).repeat(1, w, 1)], dim=-1
        )
        return pos.permute(2, 0, 1).unsqueeze(0).repeat(B, 1, 1, 1)
