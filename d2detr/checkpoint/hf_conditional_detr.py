"""Hugging Face ``ConditionalDetrForObjectDetection`` -> d2detr ``ConditionalDETR``.

Both key layouts transformers has used are accepted: the one of the Hub checkpoints
(``model.backbone.conv_encoder.model.*``, decoder ``sa_qcontent_proj`` / ``ca_qcontent_proj``
directly on the layer, ``out_proj``, ``fc1``) and the transformers 5 module names
(``model.backbone.model.*``, ``self_attn.q_content_proj``, ``encoder_attn.q_content_proj``,
``o_proj``, ``mlp.fc1``); ``ConditionalDetrForSegmentation`` checkpoints (``conditional_detr.``
prefix) give their detector.

Ours keeps the official names (Atten4Vis/ConditionalDETR): the encoder is DETR's
(``nn.MultiheadAttention``, so HF's q/k/v projections are concatenated into
``in_proj_weight``), decoder layers carry ``sa_*``/``ca_*`` projections, ``self_attn.out_proj``
and ``cross_attn.out_proj``; ``decoder.layernorm -> transformer.decoder.norm``,
``class_labels_classifier -> class_embed`` (sigmoid classes, no no-object row),
``bbox_predictor -> bbox_embed``, ``query_position_embeddings -> query_embed``.
"""
import logging
import re
from typing import Any, Dict, Iterable, List, Tuple

import torch

from . import StateDictMapper, register_converter, resolve_classes_option
from .hf_detr import _num_layers, single_scale_overrides

logger = logging.getLogger(__name__)

__all__ = ["convert_hf_conditional_detr", "hf_conditional_detr_overrides", "normalize_hf_conditional_detr_keys"]

# Hub (transformers 4) names -> transformers 5 names, applied with re.sub on every key
_LEGACY_RENAMES: List[Tuple[str, str]] = [
    (r"^conditional_detr\.", ""),
    (r"model\.backbone\.conv_encoder\.", "model.backbone."),
    (r"\.(self_attn|encoder_attn)\.out_proj\.", r".\1.o_proj."),
    (r"(layers\.\d+)\.fc([12])\.", r"\1.mlp.fc\2."),
    (r"(decoder\.layers\.\d+)\.sa_(q|k)content_proj\.", r"\1.self_attn.\2_content_proj."),
    (r"(decoder\.layers\.\d+)\.sa_(q|k)pos_proj\.", r"\1.self_attn.\2_pos_proj."),
    (r"(decoder\.layers\.\d+)\.sa_v_proj\.", r"\1.self_attn.v_proj."),
    (r"(decoder\.layers\.\d+)\.ca_(q|k)content_proj\.", r"\1.encoder_attn.\2_content_proj."),
    (r"(decoder\.layers\.\d+)\.ca_qpos_sine_proj\.", r"\1.encoder_attn.q_pos_sine_proj."),
    (r"(decoder\.layers\.\d+)\.ca_(q|k)pos_proj\.", r"\1.encoder_attn.\2_pos_proj."),
    (r"(decoder\.layers\.\d+)\.ca_v_proj\.", r"\1.encoder_attn.v_proj."),
]

# transformers 5 decoder-layer names -> ours (official ConditionalDETR)
_DECODER_LAYER_MAP = {
    "self_attn.q_content_proj": "sa_qcontent_proj",
    "self_attn.q_pos_proj": "sa_qpos_proj",
    "self_attn.k_content_proj": "sa_kcontent_proj",
    "self_attn.k_pos_proj": "sa_kpos_proj",
    "self_attn.v_proj": "sa_v_proj",
    "self_attn.o_proj": "self_attn.out_proj",
    "encoder_attn.q_content_proj": "ca_qcontent_proj",
    "encoder_attn.q_pos_proj": "ca_qpos_proj",
    "encoder_attn.k_content_proj": "ca_kcontent_proj",
    "encoder_attn.k_pos_proj": "ca_kpos_proj",
    "encoder_attn.v_proj": "ca_v_proj",
    "encoder_attn.q_pos_sine_proj": "ca_qpos_sine_proj",
    "encoder_attn.o_proj": "cross_attn.out_proj",
    "self_attn_layer_norm": "norm1",
    "encoder_attn_layer_norm": "norm2",
    "final_layer_norm": "norm3",
    "mlp.fc1": "linear1",
    "mlp.fc2": "linear2",
}


def normalize_hf_conditional_detr_keys(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Maps both HF layouts to the transformers 5 one; drops a segmentation head."""
    out = {}
    dropped = 0
    for k, v in state_dict.items():
        if k.startswith(("mask_head.", "bbox_attention.")):
            dropped += 1
            continue
        for pat, rep in _LEGACY_RENAMES:
            k = re.sub(pat, rep, k)
        out[k] = v
    if dropped:
        logger.info("Dropping %d segmentation-head tensors (detection only)", dropped)
    return out


def convert_hf_conditional_detr(
    state_dict: Dict[str, torch.Tensor], config: Dict[str, Any] = None, classes: str = "auto"
) -> Dict[str, torch.Tensor]:
    """Returns the state dict of d2detr's ``ConditionalDETR`` (``projects/conditional_detr``).

    ``classes``: ``"keep"`` the head as is; ``"coco80"`` keeps the 80 COCO thing rows of a
    91-way head indexed by COCO category id (microsoft/conditional-detr-*), in Detectron2's
    contiguous order; ``"auto"`` picks ``"coco80"`` for a 91-label head whose label 1 is
    "person", else ``"keep"``.
    """
    config = config or {}
    sd = normalize_hf_conditional_detr_keys(state_dict)
    if "model.backbone.position_embedding.row_embeddings.weight" in sd or (
        config.get("position_embedding_type", "sine") != "sine"
    ):
        raise NotImplementedError("Only Conditional DETR with sine position embeddings is supported")
    if not any(k.startswith("model.backbone.model.") for k in sd):
        raise KeyError("No backbone weights under model.backbone(.conv_encoder).model.: not a Conditional DETR checkpoint?")
    if "model.decoder.ref_point_head.layers.0.weight" not in sd:
        raise KeyError("No model.decoder.ref_point_head: not a Conditional DETR checkpoint?")

    m = StateDictMapper(sd)
    m.take_resnet_backbone("model.backbone.model.")
    m.take_weight_bias("model.input_projection", "input_proj")
    m.take("model.query_position_embeddings.weight", "query_embed.weight")
    m.take_detr_encoder_layers("model.encoder.layers.", "transformer.encoder.layers.", fc="mlp.fc")
    for i in range(_num_layers(sd, "model.decoder.layers.")):
        s, d = f"model.decoder.layers.{i}", f"transformer.decoder.layers.{i}"
        for a, b in _DECODER_LAYER_MAP.items():
            if f"{s}.{a}.weight" in sd:  # q_pos_proj exists in the first layer only
                m.take_weight_bias(f"{s}.{a}", f"{d}.{b}")
    m.take_weight_bias("model.decoder.layernorm", "transformer.decoder.norm")
    for head in ("query_scale", "ref_point_head"):
        m.take_mlp(f"model.decoder.{head}", f"transformer.decoder.{head}")

    num_labels = sd["class_labels_classifier.weight"].shape[0]
    mode = resolve_classes_option(classes, config, num_labels)
    m.take_class_head("class_labels_classifier", "class_embed", mode, extra_last=False)
    m.take_mlp("bbox_predictor", "bbox_embed")
    return m.check_all_used("HF Conditional DETR")


def hf_conditional_detr_overrides(config: Dict[str, Any], state_dict=None, classes: str = "auto", **_) -> Dict[str, Any]:
    """LazyConfig overrides for ``projects/conditional_detr/configs/*`` that build the converted
    model (keys of ``config.json``; missing ones are read off the tensors or take the defaults)."""
    config = config or {}
    sd = normalize_hf_conditional_detr_keys(state_dict) if state_dict is not None else None
    if sd is not None:
        d_model = sd["model.query_position_embeddings.weight"].shape[1]
        num_labels = sd["class_labels_classifier.weight"].shape[0]
        num_queries = sd["model.query_position_embeddings.weight"].shape[0]
        n_enc = _num_layers(sd, "model.encoder.layers.")
        n_dec = _num_layers(sd, "model.decoder.layers.")
        ffn = sd["model.encoder.layers.0.mlp.fc1.weight"].shape[0] if n_enc else config.get("encoder_ffn_dim", 2048)
    else:
        d_model = config.get("d_model", 256)
        num_labels = len(config["id2label"]) if "id2label" in config else config.get("num_labels", 91)
        num_queries = config.get("num_queries", 300)
        n_enc = config.get("encoder_layers", 6)
        n_dec = config.get("decoder_layers", 6)
        ffn = config.get("encoder_ffn_dim", 2048)
    return single_scale_overrides(config, state_dict, classes, num_labels=num_labels, num_queries=num_queries,
                                  d_model=d_model, n_enc=n_enc, n_dec=n_dec, ffn=ffn)


def _detect(keys: Iterable[str]) -> bool:
    keys = list(keys)
    return any("ref_point_head" in k for k in keys) and any("query_position_embeddings" in k for k in keys) \
        and any("class_labels_classifier" in k for k in keys)


register_converter("conditional_detr", convert_hf_conditional_detr, hf_conditional_detr_overrides, _detect)
