"""Detectron2's ResNet configured like the torchvision ResNet of the DETR papers.

The DETR family trains its ResNet with frozen BatchNorm everywhere, the stem and
res2 frozen (torchvision ``layer1``), the stride in the 3x3 conv ("ResNet v1.5",
``stride_in_1x1=False``) and, for the DC5 variant, dilation 2 in res5. Torchvision
dilates all res5 blocks but the first (``replace_stride_with_dilation``), and so
do we, so converted torchvision / DETR weights give identical features.
"""
import re
from typing import Dict, Iterable, Optional, Sequence

import torch
from detectron2.modeling.backbone import BasicStem, ResNet
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock

__all__ = ["build_resnet", "convert_torchvision_resnet_state_dict", "RESNET_BLOCKS"]

RESNET_BLOCKS = {
    18: [2, 2, 2, 2],
    34: [3, 4, 6, 3],
    50: [3, 4, 6, 3],
    101: [3, 4, 23, 3],
    152: [3, 8, 36, 3],
}


def build_resnet(
    depth: int = 50,
    out_features: Sequence[str] = ("res3", "res4", "res5"),
    freeze_at: int = 2,
    dc5: bool = False,
    norm: str = "FrozenBN",
    stride_in_1x1: bool = False,
    in_channels: int = 3,
    num_groups: int = 1,
    width_per_group: int = 64,
) -> ResNet:
    """Builds a :class:`detectron2.modeling.backbone.ResNet` (a ``Backbone``).

    Args:
        depth: 18, 34, 50, 101 or 152.
        out_features: any of "stem", "res2".."res5"; stages after the last one are dropped.
        freeze_at: 0 trains everything, 1 freezes the stem, 2 stem + res2 (DETR's default:
            only torchvision's layer2-4 train), ... 5 freezes all.
        dc5: dilate res5 (stride 16 instead of 32), bottleneck ResNets only.
        norm: Detectron2 norm name; "FrozenBN" as in the papers.
        stride_in_1x1: False puts the stride in the 3x3 conv (torchvision / DETR weights).

    Use it from a LazyConfig as ``L(build_resnet)(depth=50, out_features=["res5"])``.
    """
    if depth not in RESNET_BLOCKS:
        raise ValueError(f"ResNet depth must be one of {sorted(RESNET_BLOCKS)}, got {depth}")
    out_features = list(out_features)
    valid = {"stem", "res2", "res3", "res4", "res5"}
    if not out_features or any(f not in valid for f in out_features):
        raise ValueError(f"out_features must be a non-empty subset of {sorted(valid)}: {out_features}")
    basic = depth in (18, 34)
    if basic and dc5:
        raise ValueError("DC5 (dilated res5) needs a bottleneck ResNet (depth >= 50)")
    if basic and (num_groups != 1 or width_per_group != 64):
        raise ValueError("ResNet-18/34 support neither groups nor a custom width")

    stem = BasicStem(in_channels=in_channels, out_channels=64, norm=norm)
    num_blocks = RESNET_BLOCKS[depth]
    in_ch = 64
    out_ch = 64 if basic else 256
    bottleneck = num_groups * width_per_group
    stages = []
    for idx, n in enumerate(num_blocks):
        stage_idx = idx + 2
        dilate = dc5 and stage_idx == 5
        first_stride = 1 if idx == 0 or dilate else 2
        kwargs = dict(
            num_blocks=n,
            stride_per_block=[first_stride] + [1] * (n - 1),
            in_channels=in_ch,
            out_channels=out_ch,
            norm=norm,
        )
        if basic:
            kwargs["block_class"] = BasicBlock
        else:
            kwargs.update(
                block_class=BottleneckBlock,
                bottleneck_channels=bottleneck,
                stride_in_1x1=stride_in_1x1,
                num_groups=num_groups,
                # torchvision: the first dilated block keeps dilation 1
                dilation_per_block=[1] + [2 if dilate else 1] * (n - 1),
            )
        stages.append(ResNet.make_stage(**kwargs))
        in_ch = out_ch
        out_ch *= 2
        bottleneck *= 2
    return ResNet(stem, stages, out_features=out_features, freeze_at=freeze_at)


def convert_torchvision_resnet_state_dict(
    state_dict: Dict[str, torch.Tensor], prefix: str = ""
) -> Dict[str, torch.Tensor]:
    """Renames a torchvision ResNet state dict (``layer1.0.bn1.weight`` ...) to
    Detectron2's ResNet names (``res2.0.conv1.norm.weight`` ...).

    Only keys starting with ``prefix`` are kept (the prefix is stripped), e.g.
    ``prefix="backbone.0.body."`` for official DETR checkpoints; ``fc.*`` and
    ``num_batches_tracked`` are dropped.
    """
    out = {}
    for k, v in state_dict.items():
        if not k.startswith(prefix):
            continue
        k = k[len(prefix):]
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            continue
        if not k.startswith("layer"):
            k = "stem." + k
        k = re.sub(r"^layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", k)
        k = re.sub(r"\bbn(\d)\b", r"conv\1.norm", k)
        k = k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        out[k] = v
    return out
