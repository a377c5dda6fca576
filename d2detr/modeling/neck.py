"""Necks mapping backbone features to the transformer's width."""
from typing import Dict, List, Optional, Sequence, Union

import torch
from detectron2.layers import ShapeSpec
from torch import Tensor, nn

__all__ = ["ChannelMapper"]


class ChannelMapper(nn.Module):
    """Deformable DETR's ``input_proj``: one conv + GroupNorm per backbone level,
    then extra levels made by a 3x3 stride-2 conv + GroupNorm.

    The first extra level convolves the last *backbone* feature (not its
    projection), the following ones the previous extra level, exactly as in
    Deformable DETR. The modules are ``input_proj.{l}.0`` (conv) / ``.1`` (norm),
    the official parameter names.

    Args:
        input_shapes: the backbone's ``output_shape()``.
        in_features: which backbone features to use, fine to coarse.
        out_channels: the transformer width (256).
        num_outs: total output levels (>= len(in_features)); the rest are extra levels.
        kernel_size: of the per-level projection (1 in Deformable DETR).
        norm: "GN" (GroupNorm with ``num_groups``) or "" for none (DETR's plain 1x1 conv), or
            "shared_GN": one GroupNorm (``shared_norm``) applied to every output level, after the
            activation (AdaMixer's ``ChannelMapping`` and DEQDet's ``ChannelMapperWithGN``).
        activation: "relu" after each conv (and its per-level GroupNorm, if any) or "": DEQDet's
            neck is a 3x3 conv + ReLU per level; the other methods have no activation.
    """

    def __init__(
        self,
        input_shapes: Dict[str, ShapeSpec],
        in_features: Sequence[str],
        out_channels: int = 256,
        num_outs: Optional[int] = None,
        kernel_size: int = 1,
        norm: str = "GN",
        num_groups: int = 32,
        activation: str = "",
    ):
        super().__init__()
        in_features = list(in_features)
        num_outs = len(in_features) if num_outs is None else num_outs
        if num_outs < len(in_features):
            raise ValueError(f"num_outs ({num_outs}) < number of input features ({len(in_features)})")
        missing = [f for f in in_features if f not in input_shapes]
        if missing:
            raise ValueError(f"features {missing} not in backbone outputs {list(input_shapes)}")
        if norm not in ("GN", "", "shared_GN"):
            raise ValueError(f"norm must be 'GN', 'shared_GN' or '', got {norm!r}")
        if activation not in ("", "relu"):
            raise ValueError(f"activation must be 'relu' or '', got {activation!r}")
        self.in_features = in_features
        self.out_channels = out_channels
        self.num_outs = num_outs

        def block(cin, k, stride):
            layers = [nn.Conv2d(cin, out_channels, k, stride=stride, padding=k // 2)]
            if norm == "GN":
                layers.append(nn.GroupNorm(num_groups, out_channels))
            if activation == "relu":
                layers.append(nn.ReLU(inplace=True))
            return nn.Sequential(*layers)

        projs = [block(input_shapes[f].channels, kernel_size, 1) for f in in_features]
        cin = input_shapes[in_features[-1]].channels
        for _ in range(num_outs - len(in_features)):
            projs.append(block(cin, 3, 2))
            cin = out_channels
        self.input_proj = nn.ModuleList(projs)
        self.shared_norm = nn.GroupNorm(num_groups, out_channels) if norm == "shared_GN" else None

        strides = [input_shapes[f].stride for f in in_features]
        for _ in range(num_outs - len(in_features)):
            strides.append(strides[-1] * 2)
        self.strides = strides
        self.reset_parameters()

    def reset_parameters(self):
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

    def output_shape(self) -> List[ShapeSpec]:
        return [ShapeSpec(channels=self.out_channels, stride=s) for s in self.strides]

    def forward(self, features: Union[Dict[str, Tensor], Sequence[Tensor]]) -> List[Tensor]:
        """``features``: the backbone's dict (or a list in ``in_features`` order) -> list of
        ``num_outs`` tensors ``[B, out_channels, H_l, W_l]``, fine to coarse."""
        if isinstance(features, dict):
            xs = [features[f] for f in self.in_features]
        else:
            xs = list(features)
        n = len(xs)
        outs = [self.input_proj[i](xs[i]) for i in range(n)]
        last = xs[-1]
        for i in range(n, self.num_outs):
            last = self.input_proj[i](last)
            outs.append(last)
        if self.shared_norm is not None:
            outs = [self.shared_norm(o) for o in outs]
        return outs
