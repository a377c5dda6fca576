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

from . import StateDictMapper, register_converter, resolve_classes_option
from .hf_detr import _num_layers, single_scale_overrides

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

    m = StateDictMapper(sd)
    m.take_resnet_backbone(_BACKBONE)
    m.take_weight_bias("model.input_projection", "input_proj")
    m.take("model.query_refpoint_embeddings.weight", "refpoint_embed.weight")
    if "model.patterns.weight" in sd:
        m.take("model.patterns.weight", "transformer.patterns.weight")

    m.take_detr_encoder_layers("model.encoder.layers.", "transformer.encoder.layers.",
                               extra=[("activation_fn.weight", "activation.weight")])
    for i in range(_num_layers(sd, "model.decoder.layers.")):
        s, d = f"model.decoder.layers.{i}", f"transformer.decoder.layers.{i}"
        for a, b in _DECODER_LAYER_MAP.items():
            if f"{s}.{a}.weight" in sd:  # the query-pos projection exists in the first layer only
                m.take_weight_bias(f"{s}.{a}", f"{d}.{b}")
        if f"{s}.mlp.activation_fn.weight" in sd:
            m.take(f"{s}.mlp.activation_fn.weight", f"{d}.activation.weight")
    m.take_weight_bias("model.decoder.layernorm", "transformer.decoder.norm")
    for head in ("query_scale", "ref_point_head", "ref_anchor_head"):
        m.take_mlp(f"model.decoder.{head}", f"transformer.decoder.{head}")
    m.take_mlp("model.encoder.query_scale", "transformer.encoder.query_scale")

    num_labels = sd["class_embed.weight"].shape[0]
    mode = resolve_classes_option(classes, config, num_labels)
    m.take_class_head("class_embed", "class_embed", mode, extra_last=False)
    # one box head, used both for the outputs and (tied) for refining the anchors
    for i in range(_num_layers(sd, "bbox_predictor.layers.")):
        for p in ("weight", "bias"):
            w = sd[f"bbox_predictor.layers.{i}.{p}"]
            tied = sd.get(f"model.decoder.bbox_embed.layers.{i}.{p}")
            if tied is not None:
                if not torch.equal(tied, w):
                    raise ValueError("model.decoder.bbox_embed differs from bbox_predictor; d2detr's DAB-DETR "
                                     "shares one box head (bbox_embed_diff_each_layer is not supported)")
                m.used.add(f"model.decoder.bbox_embed.layers.{i}.{p}")
            m.out[f"bbox_embed.layers.{i}.{p}"] = w
            m.out[f"transformer.decoder.bbox_embed.layers.{i}.{p}"] = w
            m.used.add(f"bbox_predictor.layers.{i}.{p}")

    return m.check_all_used("HF DAB-DETR")


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
    if config.get("temperature_height", 20) != config.get("temperature_width", 20):
        raise NotImplementedError("different temperatures for height and width are not supported")
    depth_sd = None
    if state_dict is not None:  # _backbone_depth reads DETR's key layout
        depth_sd = {k.replace(_BACKBONE, "model.backbone.model."): v for k, v in sd.items() if k.startswith(_BACKBONE)}
    overrides = single_scale_overrides(
        config, depth_sd, classes, num_labels=num_labels, num_queries=num_queries, d_model=d_model,
        n_enc=n_enc, n_dec=n_dec, ffn=ffn, activation=activation,
    )
    overrides["model.position_embedding.temperature"] = int(config.get("temperature_height", 20))
    overrides["model.transformer.num_patterns"] = int(num_patterns)
    overrides["model.transformer.keep_query_pos"] = bool(keep_query_pos)
    return overrides


def _detect(keys: Iterable[str]) -> bool:
    keys = list(keys)
    return any("query_refpoint_embeddings" in k for k in keys) and any("ref_anchor_head" in k for k in keys)


register_converter("dab-detr", convert_hf_dab_detr, hf_dab_detr_overrides, _detect)
