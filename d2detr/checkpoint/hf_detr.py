"""Hugging Face ``DetrForObjectDetection`` -> d2detr ``DETR``.

Both key layouts transformers has used are accepted: the one of the Hub
checkpoints (``model.backbone.conv_encoder.model.*``, ``self_attn.out_proj``,
``fc1``) and the transformers 5 module names (``model.backbone.model.*``,
``o_proj``, ``mlp.fc1``); ``DetrForSegmentation`` checkpoints (``detr.`` prefix)
give their detector. HF's separate ``q/k/v_proj`` become
``nn.MultiheadAttention``'s ``in_proj_weight``; HF's class head already ends
with the no-object class, as ours does.

Name map (encoder layer / decoder layer):
``self_attn -> self_attn``, ``encoder_attn -> multihead_attn``,
``self_attn_layer_norm -> norm1``, ``encoder_attn_layer_norm -> norm2``,
``final_layer_norm -> norm2`` (encoder) / ``norm3`` (decoder),
``fc1/fc2 -> linear1/linear2``, ``decoder.layernorm -> transformer.decoder.norm``,
``query_position_embeddings -> query_embed``, ``input_projection -> input_proj``,
``class_labels_classifier -> class_embed``, ``bbox_predictor -> bbox_embed``.
"""
import logging
import re
from typing import Any, Dict, Iterable

import torch

from . import StateDictMapper, convert_hf_resnet_backbone, num_indexed, register_converter, resolve_classes_option

logger = logging.getLogger(__name__)

__all__ = ["convert_hf_detr", "hf_detr_overrides", "normalize_hf_detr_keys"]


def normalize_hf_detr_keys(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Maps both HF layouts to one: ``model.backbone.model.*``, ``out_proj``,
    ``fc1``; drops the segmentation head of ``DetrForSegmentation``."""
    out = {}
    dropped = []
    for k, v in state_dict.items():
        if k.startswith("detr."):
            k = k[len("detr."):]
        elif k.startswith(("mask_head.", "bbox_attention.")):
            dropped.append(k)
            continue
        k = k.replace("model.backbone.conv_encoder.", "model.backbone.")
        k = k.replace(".o_proj.", ".out_proj.")
        k = re.sub(r"\.mlp\.fc([12])\.", r".fc\1.", k)
        out[k] = v
    if dropped:
        logger.info("Dropping %d segmentation-head tensors (detection only)", len(dropped))
    return out


_num_layers = num_indexed  # the converters of DETR's successors import it from here


def convert_hf_detr(
    state_dict: Dict[str, torch.Tensor], config: Dict[str, Any] = None, classes: str = "auto"
) -> Dict[str, torch.Tensor]:
    """Returns the state dict of d2detr's ``DETR`` (``projects/detr``).

    ``classes``: ``"keep"`` the head as is; ``"coco80"`` keeps the 80 COCO thing
    rows (+ no-object) of a 91-way head indexed by COCO category id, the layout
    of facebook/detr-*, in Detectron2's contiguous order; ``"auto"`` picks
    ``"coco80"`` for a 91-label head whose label 1 is "person", else ``"keep"``.
    """
    config = config or {}
    sd = normalize_hf_detr_keys(state_dict)
    if "model.backbone.position_embedding.row_embeddings.weight" in sd or (
        config.get("position_embedding_type", "sine") != "sine"
    ):
        raise NotImplementedError("Only DETR with sine position embeddings is supported")
    if not any(k.startswith("model.backbone.model.") for k in sd):
        raise KeyError("No backbone weights under model.backbone(.conv_encoder).model.: not a DETR checkpoint?")

    m = StateDictMapper(sd)
    m.take_resnet_backbone("model.backbone.model.")
    m.take_weight_bias("model.input_projection", "input_proj")
    m.take("model.query_position_embeddings.weight", "query_embed.weight")
    m.take_detr_encoder_layers("model.encoder.layers.", "transformer.encoder.layers.")
    for i in range(_num_layers(sd, "model.decoder.layers.")):
        s, d = f"model.decoder.layers.{i}", f"transformer.decoder.layers.{i}"
        m.take_attention(f"{s}.self_attn", f"{d}.self_attn")
        m.take_attention(f"{s}.encoder_attn", f"{d}.multihead_attn")
        for a, b in (("self_attn_layer_norm", "norm1"), ("encoder_attn_layer_norm", "norm2"),
                     ("final_layer_norm", "norm3"), ("fc1", "linear1"), ("fc2", "linear2")):
            m.take_weight_bias(f"{s}.{a}", f"{d}.{b}")
    m.take_weight_bias("model.decoder.layernorm", "transformer.decoder.norm")

    num_labels = sd["class_labels_classifier.weight"].shape[0] - 1
    mode = resolve_classes_option(classes, config, num_labels)
    m.take_class_head("class_labels_classifier", "class_embed", mode, extra_last=True)
    m.take_mlp("bbox_predictor", "bbox_embed")
    return m.check_all_used("HF DETR")


def _backbone_depth(config: Dict[str, Any], sd) -> int:
    bb = config.get("backbone_config") or {}
    name = bb.get("backbone") or config.get("backbone")
    if name:
        # plain ResNets only (resnet50, timm/resnet50.a1_in1k); resnet50d & co. differ in the stem
        m = re.fullmatch(r"(?:timm/)?resnet(\d+)(?:\..*)?", str(name))
        if not m:
            raise ValueError(f"Unsupported backbone {name!r}: only plain ResNets (resnet18..152) convert")
        return int(m.group(1))
    if bb.get("depths"):
        depths = list(bb["depths"])
        bottleneck = bb.get("layer_type", "bottleneck") == "bottleneck"
        table = {(2, 2, 2, 2, False): 18, (3, 4, 6, 3, False): 34, (3, 4, 6, 3, True): 50,
                 (3, 4, 23, 3, True): 101, (3, 8, 36, 3, True): 152}
        return table[tuple(depths) + (bottleneck,)]
    if sd is not None:  # no config: count res4 blocks and look for 1x1 bottleneck convs
        conv = convert_hf_resnet_backbone(normalize_hf_detr_keys(sd), "model.backbone.model.")
        n4 = len({k.split(".")[1] for k in conv if k.startswith("res4.")})
        return {2: 18, 6: 50 if "res2.0.conv3.weight" in conv else 34, 23: 101, 36: 152}[n4]
    return 50


def hf_detr_overrides(config: Dict[str, Any], state_dict=None, classes: str = "auto", **_) -> Dict[str, Any]:
    """LazyConfig overrides for ``projects/detr/configs/*`` that build the
    converted model (keys of ``config.json``; missing ones are read off the
    tensors or take DETR's defaults)."""
    config = config or {}
    sd = normalize_hf_detr_keys(state_dict) if state_dict is not None else None
    d_model = config.get("d_model")
    if d_model is None and sd is not None:
        d_model = sd["model.query_position_embeddings.weight"].shape[1]
    d_model = d_model or 256
    if sd is not None:
        num_labels = sd["class_labels_classifier.weight"].shape[0] - 1
        num_queries = sd["model.query_position_embeddings.weight"].shape[0]
        n_enc = _num_layers(sd, "model.encoder.layers.")
        n_dec = _num_layers(sd, "model.decoder.layers.")
        ffn = sd["model.encoder.layers.0.fc1.weight"].shape[0] if n_enc else config.get("encoder_ffn_dim", 2048)
    else:
        num_labels = len(config["id2label"]) if "id2label" in config else config.get("num_labels", 91)
        num_queries = config.get("num_queries", 100)
        n_enc = config.get("encoder_layers", 6)
        n_dec = config.get("decoder_layers", 6)
        ffn = config.get("encoder_ffn_dim", 2048)
    return single_scale_overrides(config, state_dict, classes, num_labels=num_labels, num_queries=num_queries,
                                  d_model=d_model, n_enc=n_enc, n_dec=n_dec, ffn=ffn)


def single_scale_overrides(
    config: Dict[str, Any], state_dict, classes: str, *, num_labels: int, num_queries: int, d_model: int,
    n_enc: int, n_dec: int, ffn: int, activation: str = None,
) -> Dict[str, Any]:
    """The LazyConfig overrides DETR, Conditional DETR and DAB-DETR share (classes, queries,
    ResNet depth / DC5, widths and depths of the transformer); ``state_dict`` in DETR's
    normalised backbone layout (``model.backbone.model.*``) or None."""
    if resolve_classes_option(classes, config, num_labels) == "coco80":
        num_labels = 80
    bb = config.get("backbone_config") or {}
    dc5 = bool(config.get("dilation", False)) or bb.get("output_stride") == 16
    return {
        "model.num_classes": int(num_labels),
        "model.num_queries": int(num_queries),
        "model.backbone.depth": _backbone_depth(config, state_dict),
        "model.backbone.dc5": dc5,
        "model.position_embedding.num_pos_feats": int(d_model) // 2,
        "model.transformer.d_model": int(d_model),
        "model.transformer.nhead": int(config.get("encoder_attention_heads", 8)),
        "model.transformer.num_encoder_layers": int(n_enc),
        "model.transformer.num_decoder_layers": int(n_dec),
        "model.transformer.dim_feedforward": int(ffn),
        "model.transformer.activation": activation or config.get("activation_function", "relu"),
    }


def _detect(keys: Iterable[str]) -> bool:
    keys = list(keys)
    return any("query_position_embeddings" in k for k in keys) and any(
        "class_labels_classifier" in k for k in keys
    ) and not any(t in k for k in keys for t in ("level_embed", "query_scale", "ref_point_head"))


register_converter("detr", convert_hf_detr, hf_detr_overrides, _detect)
