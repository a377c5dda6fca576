"""Official AdaMixer (``MCG-NJU/AdaMixer``, mmdet 2) and DEQDet (``MCG-NJU/DEQDet``, mmdet 3)
checkpoints -> d2detr state dicts.

- ``adamixer_mmdet``: ``QueryBased`` detectors: ``backbone.*`` (mmdet ResNet = torchvision names),
  ``neck.lateral_convs.{l}.conv`` + ``neck.gn_out`` (``ChannelMapping``), ``rpn_head.init_proposal_bboxes``
  / ``init_content_features`` (``InitialQueryGenerator``), ``roi_head.bbox_head.{s}.*``
  (``AdaMixerDecoderStage``) -> :class:`~d2detr.projects.adamixer.modeling.AdaMixer`.
- ``deqdet_mmdet``: ``DEQDet``: ``neck.convs.{l}.conv`` + ``neck.gn_out`` (``ChannelMapperWithGN``),
  ``rpn_head.init_proposal_bboxes`` / ``init_proposal_features`` (``FixPositionEmbeddingRPNHead``),
  ``roi_head.bbox_head.0`` (initial stage) and ``.1`` (the refinement stage, ``AdaMixerHead``) ->
  :class:`~d2detr.projects.deqdet.modeling.DEQDet` (or RNNDet, same weights). DEQDet's
  ``AdaMixerHead`` inherits mmdet's ``DIIHead``, whose dynamic convolution
  (``instance_interactive_conv*``, 11.6M parameters per head) is built but never called; those
  tensors are dropped, every other one is converted or the conversion fails.

The class heads keep mmdet's 80 COCO classes, which are Detectron2's contiguous ones in the same
order. Official checkpoints are ``{"meta", "state_dict", "optimizer"}``; the ``state_dict`` is read.
"""
import re
from typing import Any, Dict, Iterable

import torch

from . import StateDictMapper, num_indexed, register_converter

__all__ = ["convert_adamixer_mmdet", "convert_deqdet_mmdet"]

StateDict = Dict[str, torch.Tensor]

#: mmdet stage (``AdaMixerDecoderStage`` / ``AdaMixerHead``) -> :class:`AdaMixerStage` names.
_STAGE_RENAMES = [
    (r"^attention\.attn\.", "attention."),
    (r"^ffn\.layers\.0\.0\.", "ffn.0."),
    (r"^ffn\.layers\.1\.", "ffn.3."),
    (r"^sampling_n_mixing\.sampling_offset_generator\.0\.", "sampling_mixing.sampling_offset_generator."),
    (r"^sampling_n_mixing\.adaptive_mixing\.parameter_generator\.0\.", "sampling_mixing.adaptive_mixing.parameter_generator."),
    (r"^sampling_n_mixing\.", "sampling_mixing."),
]
#: Every tensor name of an :class:`AdaMixerStage`; a source tensor mapping to anything else stays
#: unconverted, and the conversion fails naming it.
_STAGE_KEYS = re.compile(
    r"^(attention\.(in_proj_weight|in_proj_bias|out_proj\.(weight|bias))|iof_tau"
    r"|(attention_norm|ffn_norm|fc_cls|fc_reg|ffn\.[03]|(cls|reg)_fcs\.\d+|sampling_mixing\.(norm"
    r"|sampling_offset_generator|adaptive_mixing\.(parameter_generator|out_proj)))\.(weight|bias))$"
)
#: Tensors of mmdet's ``DIIHead`` base class that DEQDet's ``AdaMixerHead`` never uses.
_UNUSED_STAGE_KEYS = re.compile(r"^instance_interactive_conv(_norm)?\.")


def _stage_name(key: str) -> str:
    for pattern, repl in _STAGE_RENAMES:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def _take_stage(m: StateDictMapper, src: str, dst: str) -> None:
    for key in [k for k in m.sd if k.startswith(src)]:
        rest = key[len(src):]
        if _UNUSED_STAGE_KEYS.match(rest):
            m.used.add(key)
        elif _STAGE_KEYS.match(_stage_name(rest)):
            m.take(key, dst + _stage_name(rest))


def _take_common(m: StateDictMapper, neck_convs: str, content: str) -> None:
    m.take_resnet_backbone("backbone.")
    for lvl in range(num_indexed(m.sd, f"neck.{neck_convs}.")):
        m.take_weight_bias(f"neck.{neck_convs}.{lvl}.conv", f"neck.input_proj.{lvl}.0")
    m.take_weight_bias("neck.gn_out", "neck.shared_norm")
    m.take("rpn_head.init_proposal_bboxes.weight", "queries.init_boxes")
    m.take(f"rpn_head.{content}.weight", "queries.content.weight")


def convert_adamixer_mmdet(state_dict: StateDict, config=None, **_) -> StateDict:
    """Official AdaMixer ``state_dict`` -> d2detr ``AdaMixer`` state dict."""
    m = StateDictMapper(state_dict)
    _take_common(m, "lateral_convs", "init_content_features")
    for s in range(num_indexed(state_dict, "roi_head.bbox_head.")):
        _take_stage(m, f"roi_head.bbox_head.{s}.", f"stages.{s}.")
    return m.check_all_used("AdaMixer checkpoint")


def convert_deqdet_mmdet(state_dict: StateDict, config=None, **_) -> StateDict:
    """Official DEQDet ``state_dict`` -> d2detr ``DEQDet`` (and ``RNNDet``) state dict."""
    heads = num_indexed(state_dict, "roi_head.bbox_head.")
    if heads != 2:
        raise ValueError(f"a DEQDet checkpoint has an initial and a refinement head, this one has {heads} "
                         "(use_init_head=False and FFNDet checkpoints are not supported)")
    m = StateDictMapper(state_dict)
    _take_common(m, "convs", "init_proposal_features")
    _take_stage(m, "roi_head.bbox_head.0.", "init_stage.")
    _take_stage(m, "roi_head.bbox_head.1.", "refine_stage.")
    return m.check_all_used("DEQDet checkpoint")


# ----------------------------------------------------------------------------- overrides
def _depth(sd: StateDict) -> int:
    from .official import _resnet_depth

    return _resnet_depth(sd, "backbone.")


def _stage_overrides(sd: StateDict, head: str, feat_channels: int) -> Dict[str, Any]:
    """The :class:`AdaMixerStage` sizes read off one official head's tensors."""
    content = sd[f"{head}.fc_reg.weight"].shape[1]
    offsets = sd[f"{head}.sampling_n_mixing.sampling_offset_generator.0.weight"].shape[0]  # G * P_in * 3
    params = sd[f"{head}.sampling_n_mixing.adaptive_mixing.parameter_generator.0.weight"].shape[0]
    proj_in = sd[f"{head}.sampling_n_mixing.adaptive_mixing.out_proj.weight"].shape[1]  # C_feat * P_out
    out_points = proj_in // feat_channels
    group_points = offsets // 3
    # parameter_generator: G * (C/G)^2 + G * P_in * P_out outputs
    groups = feat_channels ** 2 // (params - group_points * out_points)
    return {
        "model.num_classes": int(sd[f"{head}.fc_cls.weight"].shape[0]),
        "model.queries.content_dim": int(content),
        "model.stage.content_dim": int(content),
        "model.stage.feat_channels": int(feat_channels),
        "model.stage.num_heads": int(sd[f"{head}.iof_tau"].shape[0]),
        "model.stage.ffn_dim": int(sd[f"{head}.ffn.layers.0.0.weight"].shape[0]),
        "model.stage.in_points": int(group_points // groups),
        "model.stage.out_points": int(out_points),
        "model.stage.num_groups": int(groups),
        # Linear, LayerNorm, ReLU per block: the last block's LayerNorm is index 3n - 2
        "model.stage.num_cls_fcs": (num_indexed(sd, f"{head}.cls_fcs.") + 1) // 3,
        "model.stage.num_reg_fcs": (num_indexed(sd, f"{head}.reg_fcs.") + 1) // 3,
    }


def _common_overrides(sd: StateDict, neck_convs: str, content: str) -> Dict[str, Any]:
    conv = sd[f"neck.{neck_convs}.0.conv.weight"]
    return {
        "model.backbone.depth": _depth(sd),
        "model.num_queries": int(sd[f"rpn_head.{content}.weight"].shape[0]),
        "model.neck.out_channels": int(conv.shape[0]),
        "model.neck.kernel_size": int(conv.shape[-1]),
    }


def adamixer_overrides(config=None, state_dict=None, **_) -> Dict[str, Any]:
    sd = state_dict
    out = _common_overrides(sd, "lateral_convs", "init_content_features")
    out.update(_stage_overrides(sd, "roi_head.bbox_head.0", out["model.neck.out_channels"]))
    out["model.num_stages"] = num_indexed(sd, "roi_head.bbox_head.")
    return out


def deqdet_overrides(config=None, state_dict=None, **_) -> Dict[str, Any]:
    sd = state_dict
    out = _common_overrides(sd, "convs", "init_proposal_features")
    out.update(_stage_overrides(sd, "roi_head.bbox_head.1", out["model.neck.out_channels"]))
    return out


def _is_adamixer_family(keys) -> bool:
    return any(k.endswith("sampling_n_mixing.adaptive_mixing.parameter_generator.0.weight") for k in keys)


def _detect_adamixer(keys: Iterable[str]) -> bool:
    keys = set(keys)
    return _is_adamixer_family(keys) and "rpn_head.init_content_features.weight" in keys


def _detect_deqdet(keys: Iterable[str]) -> bool:
    keys = set(keys)
    return _is_adamixer_family(keys) and "rpn_head.init_proposal_features.weight" in keys


register_converter("adamixer_mmdet", convert_adamixer_mmdet, adamixer_overrides, _detect_adamixer)
register_converter("deqdet_mmdet", convert_deqdet_mmdet, deqdet_overrides, _detect_deqdet)
