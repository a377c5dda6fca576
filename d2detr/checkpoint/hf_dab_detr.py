"""Hugging Face ``DabDetrForObjectDetection`` -> d2detr ``DABDETR`` (``projects/dab_detr``).

HF layout (the Hub's IDEA-Research/dab-detr-* checkpoints and transformers 5 alike):
``model.backbone.conv_encoder.model[._backbone].*`` (timm or transformers ResNet),
encoder layers with DETR attention (``q/k/v_proj``, ``out_proj``) and ``activation_fn``
(PReLU), decoder layers with ``self_attn.self_attn_query_content_proj`` ...,
``cross_attn.cross_attn_query_pos_sine_proj``, ``mlp.fc1``; ``model.o_proj`` spellings are
accepted too. Ours keeps the official names (IDEA-Research/DAB-DETR): DETR encoder layers
(``nn.MultiheadAttention``: q/k/v concatenated into ``in_proj_weight``), Conditional-DETR
decoder layers (``sa_qcontent_proj`` ... ``ca_qpos_sine_proj``, ``self_attn.out_proj``,
``cross_attn.out_proj``, ``norm1..3``, ``linear1/2``, ``activation``),
``query_refpoint_embeddings -> refpoint_embed``, ``patterns -> transformer.patterns``,
``class_embed``, ``bbox_predictor -> bbox_embed`` (shared with ``transformer.decoder.bbox_embed``).
"""
import logging
import re
from typing import Any, Dict, Iterable

import torch

from . import (
    coco91_to_contiguous_rows,
    concat_qkv,
    convert_hf_resnet_backbone,
    register_converter,
    resolve_classes_option,
    select_class_rows,
)
from .hf_detr import _backbone_depth, _num_layers

logger = logging.getLogger(__name__)

__all__ = ["convert_hf_dab_detr", "hf_dab_detr_overrides", "normalize_hf_dab_detr_keys"]

_DECODER_LAYER_MAP = {
    "self_attn.self_attn_query_content_proj": "sa_qcontent_proj",
    "self_attn.self_attn_query_pos_proj": "sa_qpos_proj",
    "self_attn.self_attn_key_content_proj": "sa_kcontent_proj",
    "self_attn.self_attn_key_pos_proj": "sa_kpos_proj",
    "self_attn.self_attn_value_proj": "sa_v_proj",
    "self_attn.self_attn.output_proj": "self_attn.out_proj",
    "self_attn.self_attn_layer_norm": "norm1",
    "cross_attn.cross_attn_query_content_proj": "ca_qcontent_proj",
    "cross_attn.cross_attn_query_pos_proj": "ca_qpos_proj",
    "cross_attn.cross_attn_key_content_proj": "ca_kcontent_proj",
    "cross_attn.cross_attn_key_pos_proj": "ca_kpos_proj",
    "cross_attn.cross_attn_value_proj": "ca_v_proj",
    "cross_attn.cross_attn_query_pos_sine_proj": "ca_qpos_sine_proj",
    "cross_attn.cross_attn.output_proj": "cross_attn.out_proj",
    "cross_attn.cross_attn_layer_norm": "norm2",
    "mlp.final_layer_norm": "norm3",
    "mlp.fc1": "linear1",
    "mlp.fc2": "linear2",
}

_BACKBONE = "model.backbone.model."


def normalize_hf_dab_detr_keys(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """One layout: backbone under ``model.backbone.model.`` (timm's ``_backbone`` wrapper
    dropped), attention outputs ``out_proj``."""
    out = {}
    for k, v in state_dict.items():
        k = k.replace("model.backbone.conv_encoder.model._backbone.", _BACKBONE)
        k = k.replace("model.backbone.conv_encoder.model.", _BACKBONE)
        k = re.sub(r"\.self_attn\.o_proj\.", ".self_attn.out_proj.", k)
        out[k] = v
    return out


def convert_hf_dab_detr(
    state_dict: Dict[str, torch.Tensor], config: Dict[str, Any] = None, classes: str = "auto"
) -> Dict[str, torch.Tensor]:
    """Returns the state dict of d2detr's ``DABDETR``. ``classes`` as for the other
    converters: ``"keep"``, ``"coco80"`` (91-way COCO-id head -> Detectron2's 80 classes) or
    ``"auto"`` (``"coco80"`` for a 91-label head whose label 1 is "person")."""
    config = config or {}
    sd = normalize_hf_dab_detr_keys(state_dict)
    if not any(k.startswith(_BACKBONE) for k in sd):
        raise KeyError("No backbone weights under model.backbone.conv_encoder.model.: not a DAB-DETR checkpoint?")
    if "model.query_refpoint_embeddings.weight" not in sd:
        raise KeyError("No model.query_refpoint_embeddings: not a DAB-DETR checkpoint?")
    if sd["model.query_refpoint_embeddings.weight"].shape[1] != 4:
        raise NotImplementedError("Only 4-D anchors (query_dim 4) are supported")
    if "model.decoder.ref_anchor_head.layers.0.weight" not in sd:
        raise NotImplementedError("Only DAB-DETR with width/height-modulated attention is supported")

    out: Dict[str, torch.Tensor] = {}
    used = set()

    def take(src, dst):
        out[dst] = sd[src]
        used.add(src)

    for k, v in convert_hf_resnet_backbone(sd, _BACKBONE).items():
        out["backbone." + k] = v
    used.update(k for k in sd if k.startswith(_BACKBONE))
    for p in ("weight", "bias"):
        take(f"model.input_projection.{p}", f"input_proj.{p}")
    take("model.query_refpoint_embeddings.weight", "refpoint_embed.weight")
    if "model.patterns.weight" in sd:
        take("model.patterns.weight", "transformer.patterns.weight")

    for i in range(_num_layers(sd, "model.encoder.layers.")):
        s, d = f"model.encoder.layers.{i}", f"transformer.encoder.layers.{i}"
        out.update(concat_qkv(sd, f"{s}.self_attn", f"{d}.self_attn"))
        used.update(f"{s}.self_attn.{n}_proj.{p}" for n in ("q", "k", "v", "out") for p in ("weight", "bias"))
        for a, b in (("self_attn_layer_norm", "norm1"), ("final_layer_norm", "norm2"),
                     ("fc1", "linear1"), ("fc2", "linear2")):
            for p in ("weight", "bias"):
                take(f"{s}.{a}.{p}", f"{d}.{b}.{p}")
        if f"{s}.activation_fn.weight" in sd:
            take(f"{s}.activation_fn.weight", f"{d}.activation.weight")
    for i in range(_num_layers(sd, "model.decoder.layers.")):
        s, d = f"model.decoder.layers.{i}", f"transformer.decoder.layers.{i}"
        for a, b in _DECODER_LAYER_MAP.items():
            for p in ("weight", "bias"):
                if f"{s}.{a}.{p}" in sd:  # the query-pos projection exists in the first layer only
                    take(f"{s}.{a}.{p}", f"{d}.{b}.{p}")
        if f"{s}.mlp.activation_fn.weight" in sd:
            take(f"{s}.mlp.activation_fn.weight", f"{d}.activation.weight")
    for p in ("weight", "bias"):
        take(f"model.decoder.layernorm.{p}", f"transformer.decoder.norm.{p}")
    for head in ("query_scale", "ref_point_head", "ref_anchor_head"):
        for i in range(_num_layers(sd, f"model.decoder.{head}.layers.")):
            for p in ("weight", "bias"):
                take(f"model.decoder.{head}.layers.{i}.{p}", f"transformer.decoder.{head}.layers.{i}.{p}")
    for i in range(_num_layers(sd, "model.encoder.query_scale.layers.")):
        for p in ("weight", "bias"):
            take(f"model.encoder.query_scale.layers.{i}.{p}", f"transformer.encoder.query_scale.layers.{i}.{p}")

    num_labels = sd["class_embed.weight"].shape[0]
    mode = resolve_classes_option(classes, config, num_labels)
    for p in ("weight", "bias"):
        w = sd[f"class_embed.{p}"]
        if mode == "coco80":
            w = select_class_rows(w, coco91_to_contiguous_rows(), extra_last=False)
        out[f"class_embed.{p}"] = w
        used.add(f"class_embed.{p}")
    # one box head, used both for the outputs and (tied) for refining the anchors
    for i in range(_num_layers(sd, "bbox_predictor.layers.")):
        for p in ("weight", "bias"):
            w = sd[f"bbox_predictor.layers.{i}.{p}"]
            tied = sd.get(f"model.decoder.bbox_embed.layers.{i}.{p}")
            if tied is not None:
                if not torch.equal(tied, w):
                    raise ValueError("model.decoder.bbox_embed differs from bbox_predictor; d2detr's DAB-DETR "
                                     "shares one box head (bbox_embed_diff_each_layer is not supported)")
                used.add(f"model.decoder.bbox_embed.layers.{i}.{p}")
            out[f"bbox_embed.layers.{i}.{p}"] = w
            out[f"transformer.decoder.bbox_embed.layers.{i}.{p}"] = w
            used.add(f"bbox_predictor.layers.{i}.{p}")

    left = sorted(set(sd) - used)
    if left:
        raise KeyError(f"{len(left)} HF DAB-DETR tensors were not converted, e.g. {left[:5]}")
    return out


def hf_dab_detr_overrides(config: Dict[str, Any], state_dict=None, classes: str = "auto", **_) -> Dict[str, Any]:
    """LazyConfig overrides for ``projects/dab_detr/configs/*`` that build the converted model."""
    config = config or {}
    sd = normalize_hf_dab_detr_keys(state_dict) if state_dict is not None else None
    if sd is not None:
        d_model = sd["model.input_projection.weight"].shape[0]
        num_labels = sd["class_embed.weight"].shape[0]
        num_queries = sd["model.query_refpoint_embeddings.weight"].shape[0]
        n_enc = _num_layers(sd, "model.encoder.layers.")
        n_dec = _num_layers(sd, "model.decoder.layers.")
        ffn = sd["model.encoder.layers.0.fc1.weight"].shape[0] if n_enc else config.get("encoder_ffn_dim", 2048)
        num_patterns = sd["model.patterns.weight"].shape[0] if "model.patterns.weight" in sd else 0
        keep_query_pos = n_dec > 1 and "model.decoder.layers.1.cross_attn.cross_attn_query_pos_proj.weight" in sd
        prelu = any(k.endswith("activation_fn.weight") for k in sd)
        activation = "prelu" if prelu else config.get("activation_function", "relu")
    else:
        d_model = config.get("hidden_size", config.get("d_model", 256))
        num_labels = len(config["id2label"]) if "id2label" in config else config.get("num_labels", 91)
        num_queries = config.get("num_queries", 300)
        n_enc = config.get("encoder_layers", 6)
        n_dec = config.get("decoder_layers", 6)
        ffn = config.get("encoder_ffn_dim", 2048)
        num_patterns = config.get("num_patterns", 0)
        keep_query_pos = config.get("keep_query_pos", False)
        activation = config.get("activation_function", "prelu")
    if resolve_classes_option(classes, config, num_labels) == "coco80":
        num_labels = 80
    bb = config.get("backbone_config") or {}
    dc5 = bool(config.get("dilation", False)) or bb.get("output_stride") == 16
    if config.get("temperature_height", 20) != config.get("temperature_width", 20):
        raise NotImplementedError("different temperatures for height and width are not supported")
    depth_sd = None
    if state_dict is not None:  # _backbone_depth reads DETR's key layout
        depth_sd = {k.replace(_BACKBONE, "model.backbone.model."): v for k, v in sd.items() if k.startswith(_BACKBONE)}
    return {
        "model.num_classes": int(num_labels),
        "model.num_queries": int(num_queries),
        "model.backbone.depth": _backbone_depth(config, depth_sd),
        "model.backbone.dc5": dc5,
        "model.position_embedding.num_pos_feats": int(d_model) // 2,
        "model.position_embedding.temperature": int(config.get("temperature_height", 20)),
        "model.transformer.d_model": int(d_model),
        "model.transformer.nhead": int(config.get("encoder_attention_heads", 8)),
        "model.transformer.num_encoder_layers": int(n_enc),
        "model.transformer.num_decoder_layers": int(n_dec),
        "model.transformer.dim_feedforward": int(ffn),
        "model.transformer.activation": activation,
        "model.transformer.num_patterns": int(num_patterns),
        "model.transformer.keep_query_pos": bool(keep_query_pos),
    }


def _detect(keys: Iterable[str]) -> bool:
    keys = list(keys)
    return any("query_refpoint_embeddings" in k for k in keys) and any("ref_anchor_head" in k for k in keys)


register_converter("dab-detr", convert_hf_dab_detr, hf_dab_detr_overrides, _detect)
