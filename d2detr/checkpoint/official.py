"""Non-Hugging-Face sources: torchvision ResNets and the official DETR checkpoints.

- ``torchvision_resnet``: an ImageNet ResNet from torchvision
  (``resnet50-*.pth``: ``conv1.weight``, ``layer1.0.bn1.running_mean`` ...) ->
  ``backbone.*`` of any d2detr model with a ``build_resnet`` backbone, the
  usual ``train.init_checkpoint`` of the DETR-family configs (the other
  weights stay at their initialisation; Detectron2 reports them as missing).
- ``detr_official``: facebookresearch/detr checkpoints (``detr-r50-e632da11.pth``,
  ``{"model": {"backbone.0.body.*", "transformer.*", ...}}``). d2detr's DETR
  keeps the official parameter names, so only the backbone is renamed. DC5 is
  not visible in the weights: pick the ``*_dc5_*`` config for DC5 checkpoints.
"""
import re
from typing import Any, Dict, Iterable

import torch

from . import (
    coco91_to_contiguous_rows,
    register_converter,
    resolve_classes_option,
    select_class_rows,
)

__all__ = ["convert_torchvision_resnet", "convert_official_detr"]

_DEPTH_BY_RES4_BLOCKS = {2: 18, 23: 101, 36: 152}


def _resnet_depth(sd: Dict[str, torch.Tensor], prefix: str) -> int:
    blocks = {int(m.group(1)) for k in sd for m in [re.match(re.escape(prefix) + r"layer3\.(\d+)\.", k)] if m}
    n = max(blocks) + 1 if blocks else 0
    if n == 6:
        return 50 if f"{prefix}layer1.0.conv3.weight" in sd else 34
    if n not in _DEPTH_BY_RES4_BLOCKS:
        raise ValueError(f"Cannot tell the ResNet depth from {n} blocks in layer3")
    return _DEPTH_BY_RES4_BLOCKS[n]


def _backbone(sd, prefix):
    from d2detr.modeling.backbone.resnet import convert_torchvision_resnet_state_dict

    return {"backbone." + k: v for k, v in convert_torchvision_resnet_state_dict(sd, prefix).items()}


# ------------------------------------------------------------ torchvision ResNet
def convert_torchvision_resnet(state_dict, config=None, **_) -> Dict[str, torch.Tensor]:
    return _backbone(state_dict, "")


def torchvision_resnet_overrides(config=None, state_dict=None, **_) -> Dict[str, Any]:
    return {"model.backbone.depth": _resnet_depth(state_dict, "")} if state_dict is not None else {}


def _detect_torchvision(keys: Iterable[str]) -> bool:
    keys = set(keys)
    return "conv1.weight" in keys and "layer1.0.conv1.weight" in keys and not any(
        k.startswith(("transformer.", "backbone.")) for k in keys
    )


# ----------------------------------------------------------------- official DETR
_OFFICIAL_BACKBONE = "backbone.0.body."


def convert_official_detr(state_dict, config=None, classes: str = "auto", **_) -> Dict[str, torch.Tensor]:
    """Official DETR ``model`` state dict -> d2detr ``DETR`` state dict.

    ``classes``: the official heads have 91 COCO-id classes + no-object;
    ``"auto"``/``"coco80"`` keep Detectron2's 80 contiguous classes, ``"keep"`` all.
    """
    if "backbone.0.body.conv1.weight" not in state_dict:
        raise KeyError("not an official DETR checkpoint: no backbone.0.body.conv1.weight")
    out = _backbone(state_dict, _OFFICIAL_BACKBONE)
    for k, v in state_dict.items():
        if not k.startswith("backbone."):
            out[k] = v
    num_labels = state_dict["class_embed.weight"].shape[0] - 1
    if resolve_classes_option(classes, config or {}, num_labels) == "coco80":
        for p in ("weight", "bias"):
            out[f"class_embed.{p}"] = select_class_rows(
                state_dict[f"class_embed.{p}"], coco91_to_contiguous_rows(), extra_last=True
            )
    return out


def _layers(sd, prefix):
    idx = {int(m.group(1)) for k in sd for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m}
    return max(idx) + 1 if idx else 0


def official_detr_overrides(config=None, state_dict=None, classes: str = "auto", **_) -> Dict[str, Any]:
    sd = state_dict
    num_labels = sd["class_embed.weight"].shape[0] - 1
    if resolve_classes_option(classes, config or {}, num_labels) == "coco80":
        num_labels = 80
    q, d_model = sd["query_embed.weight"].shape
    return {
        "model.num_classes": int(num_labels),
        "model.num_queries": int(q),
        "model.backbone.depth": _resnet_depth(sd, _OFFICIAL_BACKBONE),
        "model.position_embedding.num_pos_feats": int(d_model) // 2,
        "model.transformer.d_model": int(d_model),
        "model.transformer.num_encoder_layers": _layers(sd, "transformer.encoder.layers."),
        "model.transformer.num_decoder_layers": _layers(sd, "transformer.decoder.layers."),
        "model.transformer.dim_feedforward": int(sd["transformer.encoder.layers.0.linear1.weight"].shape[0]),
    }


def _detect_official(keys: Iterable[str]) -> bool:
    keys = set(keys)
    return (
        "backbone.0.body.conv1.weight" in keys
        and "query_embed.weight" in keys
        and "transformer.decoder.norm.weight" in keys
        and not any(t in k for k in keys for t in ("level_embed", "query_scale", "ref_point_head"))
    )


register_converter("torchvision_resnet", convert_torchvision_resnet, torchvision_resnet_overrides,
                   _detect_torchvision)
register_converter("detr_official", convert_official_detr, official_detr_overrides, _detect_official)
