"""Hugging Face ``DeformableDetrForObjectDetection`` -> d2detr ``DeformableDETR``.

The HF checkpoints (``SenseTime/deformable-detr``, ``-with-box-refine``,
``-with-box-refine-two-stage``, ``-single-scale``) are the most used public Deformable DETR
weights. Their layout (``model_type == "deformable_detr"``) maps onto ours as follows:

===============================================  ==============================================
HF                                               d2detr
===============================================  ==============================================
model.backbone.model.* (timm ResNet)             backbone.* (Detectron2 ResNet names)
model.input_proj.{l}.{0,1}                       neck.input_proj.{l}.{0,1}
model.level_embed                                transformer.level_embed
model.query_position_embeddings                  query_embed
model.reference_points / enc_output(_norm) /     transformer.<same>
pos_trans(_norm)
model.encoder.layers.{i}.self_attn               transformer.encoder.layers.{i}.self_attn
  .self_attn_layer_norm / .mlp.fc1 / .mlp.fc2      .norm1 / .linear1 / .linear2
  / .final_layer_norm                              / .norm2
model.decoder.layers.{i}.self_attn.{q,k,v}_proj  transformer.decoder.layers.{i}.self_attn.in_proj_*
  .self_attn.o_proj (out_proj in transformers 4)   .self_attn.out_proj
  .self_attn_layer_norm / .encoder_attn            .norm2 / .cross_attn
  / .encoder_attn_layer_norm / .mlp.fc1|fc2        / .norm1 / .linear1|2
  / .final_layer_norm                              / .norm3
class_embed.{i} / bbox_embed.{i}                 class_embed.{i} / bbox_embed.{i}
===============================================  ==============================================

``model.decoder.{class,bbox}_embed`` are aliases of the top-level heads (tied in HF, the same
modules in ours, listed again as ``transformer.decoder.{class,bbox}_embed`` in our state dict);
they are only read when a top-level head is missing from the file.
Transformers 4 names (``fc1`` directly on the layer, ``out_proj``) are accepted too.
The public checkpoints' 91-way heads (indexed by COCO category id) become Detectron2's 80
contiguous COCO classes by default (``classes="coco80"``, see :func:`convert_hf_deformable_detr`).
"""
import re
from typing import Any, Dict, Iterable, Mapping, Optional

import torch
from torch import Tensor

from . import (
    coco91_to_contiguous_rows,
    convert_hf_resnet_backbone,
    num_indexed,
    register_converter,
    resolve_classes_option,
    select_class_rows,
)
from .hf_detr import _backbone_depth  # ResNet depth from the config or the tensors

__all__ = ["convert_hf_deformable_detr", "hf_deformable_detr_overrides", "normalize_hf_deformable_detr_keys"]

_ENC_LAYER = [
    (r"self_attn_layer_norm\.", "norm1."),
    (r"(mlp\.)?fc1\.", "linear1."),
    (r"(mlp\.)?fc2\.", "linear2."),
    (r"final_layer_norm\.", "norm2."),
    (r"self_attn\.", "self_attn."),
]
_DEC_LAYER = [
    (r"self_attn_layer_norm\.", "norm2."),
    (r"encoder_attn_layer_norm\.", "norm1."),
    (r"encoder_attn\.", "cross_attn."),
    (r"(mlp\.)?fc1\.", "linear1."),
    (r"(mlp\.)?fc2\.", "linear2."),
    (r"final_layer_norm\.", "norm3."),
    (r"self_attn\.(o_proj|out_proj)\.", "self_attn.out_proj."),
]
_TOP_LEVEL = {
    "model.level_embed": "transformer.level_embed",
    "model.query_position_embeddings.weight": "query_embed.weight",
}
_TRANSFORMER_MODULES = ("reference_points", "enc_output", "enc_output_norm", "pos_trans", "pos_trans_norm")


def _rename_layer(rest: str, rules) -> Optional[str]:
    for pattern, repl in rules:
        m = re.match(pattern, rest)
        if m:
            return repl + rest[m.end():]
    return None


def _num_labels(sd: Mapping[str, Tensor]) -> int:
    for k in ("class_embed.0.weight", "model.decoder.class_embed.0.weight"):
        if k in sd:
            return sd[k].shape[0]
    raise KeyError("no class_embed.0.weight: not a Deformable DETR checkpoint?")


_num_layers = num_indexed


def convert_hf_deformable_detr(
    state_dict: Mapping[str, Tensor], config: Optional[Dict[str, Any]] = None, classes: str = "auto"
) -> Dict[str, Tensor]:
    """Returns the state dict of d2detr's ``DeformableDETR`` (``projects/deformable_detr``).

    ``classes``: ``"keep"`` the class heads as they are; ``"coco80"`` keeps the 80 COCO thing
    rows of a 91-way head indexed by COCO category id (the public checkpoints), in Detectron2's
    contiguous order; ``"auto"`` picks ``"coco80"`` for a 91-label head whose label 1 is
    "person", else ``"keep"``. The two-stage proposal head (the extra, last class head) ranks
    proposals by its logit 0, so under ``"coco80"`` it keeps HF's row 0 first.
    """
    config = config or {}
    sd = normalize_hf_deformable_detr_keys(state_dict)
    if not any(k.startswith("model.backbone.model.") for k in sd):
        raise KeyError("no backbone weights under model.backbone(.conv_encoder).model.: not a Deformable DETR checkpoint?")
    out: Dict[str, Tensor] = {}
    unknown = []

    for k, v in convert_hf_resnet_backbone(sd, "model.backbone.model.").items():
        out["backbone." + k] = v

    qkv: Dict[str, Dict[str, Tensor]] = {}
    heads: Dict[tuple, Tensor] = {}  # (top-level?, kind, index, rest) -> tensor
    for k, v in sd.items():
        if k.startswith("model.backbone."):
            if not k.startswith("model.backbone.model."):
                unknown.append(k)
            continue
        if k in _TOP_LEVEL:
            out[_TOP_LEVEL[k]] = v
            continue
        m = re.match(r"model\.input_proj\.(\d+)\.(\d+)\.(weight|bias)$", k)
        if m:
            out[f"neck.input_proj.{m.group(1)}.{m.group(2)}.{m.group(3)}"] = v
            continue
        m = re.match(r"model\.(%s)\.(weight|bias)$" % "|".join(_TRANSFORMER_MODULES), k)
        if m:
            out[f"transformer.{m.group(1)}.{m.group(2)}"] = v
            continue
        m = re.match(r"model\.encoder\.layers\.(\d+)\.(.*)$", k)
        if m:
            new = _rename_layer(m.group(2), _ENC_LAYER)
            if new is None:
                unknown.append(k)
            else:
                out[f"transformer.encoder.layers.{m.group(1)}.{new}"] = v
            continue
        m = re.match(r"model\.decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", k)
        if m:
            name = f"transformer.decoder.layers.{m.group(1)}.self_attn.in_proj_{m.group(3)}"
            qkv.setdefault(name, {})[m.group(2)] = v
            continue
        m = re.match(r"model\.decoder\.layers\.(\d+)\.(.*)$", k)
        if m:
            new = _rename_layer(m.group(2), _DEC_LAYER)
            if new is None:
                unknown.append(k)
            else:
                out[f"transformer.decoder.layers.{m.group(1)}.{new}"] = v
            continue
        m = re.match(r"(model\.decoder\.)?(class_embed|bbox_embed)\.(\d+)\.(.*)$", k)
        if m:
            heads[(m.group(1) is None, m.group(2), int(m.group(3)), m.group(4))] = v
            continue
        unknown.append(k)
    if unknown:
        raise KeyError(f"{len(unknown)} HF Deformable DETR tensors were not converted, e.g. {unknown[:5]}")

    for name, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"incomplete q/k/v projections for {name}: {sorted(parts)}")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)

    num_dec = _num_layers(sd, "model.decoder.layers.")
    two_stage = "model.enc_output.weight" in sd
    refine = two_stage or any(not top and kind == "bbox_embed" for top, kind, _, _ in heads) or bool(
        config.get("with_box_refine")
    )
    num_pred = num_dec + (1 if two_stage else 0)
    num_labels = next((v.shape[0] for (top, kind, i, rest), v in heads.items() if kind == "class_embed" and rest == "weight"), None)
    if num_labels is None:
        raise KeyError("no class_embed weights: not a Deformable DETR checkpoint?")
    mode = resolve_classes_option(classes, config, num_labels)
    rows = coco91_to_contiguous_rows() if mode == "coco80" else None
    for kind in ("class_embed", "bbox_embed"):
        rests = sorted({rest for (_, k, _, rest) in heads if k == kind})
        for i in range(num_pred):
            for rest in rests:
                # heads HF ties (and so saves once): per layer, else the decoder's copy, else
                # head 0 (all layers share one head without refinement; class heads also with
                # refinement alone in transformers)
                for key in ((True, kind, i, rest), (False, kind, i, rest), (True, kind, 0, rest), (False, kind, 0, rest)):
                    if key in heads:
                        v = heads[key]
                        break
                else:
                    raise KeyError(f"no weights for {kind}.{i}.{rest}")
                if rows is not None and kind == "class_embed":
                    head_rows = [0] + list(rows[1:]) if two_stage and i == num_dec else rows
                    v = select_class_rows(v, head_rows, extra_last=False)
                out[f"{kind}.{i}.{rest}"] = v
                # our decoder holds the same head modules, so its state dict lists them again
                if (refine and kind == "bbox_embed") or (two_stage and kind == "class_embed"):
                    out[f"transformer.decoder.{kind}.{i}.{rest}"] = v
    return out


def normalize_hf_deformable_detr_keys(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Both HF layouts to one: ``model.backbone.conv_encoder.model.*`` (the Hub files, and what
    ``save_pretrained`` writes) -> ``model.backbone.model.*``; drops ``num_batches_tracked``."""
    out = {}
    for k, v in state_dict.items():
        if k.endswith("num_batches_tracked"):
            continue
        out[k.replace("model.backbone.conv_encoder.", "model.backbone.", 1)] = v
    return out


def hf_deformable_detr_overrides(
    config: Dict[str, Any], state_dict=None, classes: str = "auto", **_
) -> Dict[str, Any]:
    """LazyConfig overrides for ``projects/deformable_detr/configs/*`` that build the model of an
    HF ``DeformableDetrConfig`` (its ``to_dict()``); missing keys are read off the tensors
    when a state dict is given, else take the official defaults."""
    config = dict(config or {})
    sd = normalize_hf_deformable_detr_keys(state_dict) if state_dict is not None else None
    if config.get("dilation"):
        raise NotImplementedError("dilated (DC5) Deformable DETR backbones are not supported")
    if config.get("position_embedding_type", "sine") != "sine":
        raise NotImplementedError("only sine position embeddings are supported")
    if config.get("encoder_attention_heads", 8) != config.get("decoder_attention_heads", 8):
        raise NotImplementedError("different encoder and decoder head counts are not supported")

    def get(key, default, from_sd=None):
        if key in config:
            return config[key]
        if sd is not None and from_sd is not None:
            try:
                return from_sd()
            except (KeyError, IndexError):
                pass
        return default

    two_stage = bool(get("two_stage", False, lambda: "model.enc_output.weight" in sd))
    refine = bool(get("with_box_refine", False, lambda: "model.decoder.bbox_embed.0.layers.0.weight" in sd))
    d_model = int(get("d_model", 256, lambda: sd["model.level_embed"].shape[1]))
    levels = int(get("num_feature_levels", 4, lambda: sd["model.level_embed"].shape[0]))
    n_enc = int(get("encoder_layers", 6, lambda: _num_layers(sd, "model.encoder.layers.") or 6))
    n_dec = int(get("decoder_layers", 6, lambda: _num_layers(sd, "model.decoder.layers.") or 6))
    heads = int(get("encoder_attention_heads", 8))
    if two_stage:
        num_queries = int(get("two_stage_num_proposals", 300))
    else:
        num_queries = int(get("num_queries", 300, lambda: sd["model.query_position_embeddings.weight"].shape[0]))
    if sd is not None:
        num_labels = _num_labels(sd)
    elif "id2label" in config:
        num_labels = len(config["id2label"])
    else:
        num_labels = int(config.get("num_labels", 91))
    if resolve_classes_option(classes, config, num_labels) == "coco80":
        num_labels = 80
    depth = _backbone_depth(config, sd)
    if levels == 2:
        raise NotImplementedError("num_feature_levels=2: only 1 (res5) or >= 3 (res3-res5 + extras) convert")
    chans = (128, 256, 512) if depth in (18, 34) else (512, 1024, 2048)
    feats = ["res5"] if levels == 1 else ["res3", "res4", "res5"]
    out = {
        "model.num_classes": num_labels,
        "model.num_queries": num_queries,
        "model.embed_dim": d_model,
        "model.with_box_refine": refine or two_stage,
        "model.backbone.depth": depth,
        "model.backbone.out_features": feats,
        "model.neck.in_features": feats,
        "model.neck.num_outs": levels,
        "model.neck.out_channels": d_model,
        "model.position_embedding.num_pos_feats": d_model // 2,
        "model.transformer.embed_dim": d_model,
        "model.transformer.num_feature_levels": levels,
        "model.transformer.two_stage": two_stage,
        "model.transformer.encoder.num_layers": n_enc,
        "model.transformer.decoder.num_layers": n_dec,
    }
    for name, c in zip(("res3", "res4", "res5"), chans):
        if name in feats:
            out[f"model.neck.input_shapes.{name}.channels"] = c
    for part, layer, side in (("encoder", "encoder_layer", "encoder"), ("decoder", "decoder_layer", "decoder")):
        p = f"model.transformer.{part}.{layer}."
        out[p + "embed_dim"] = d_model
        out[p + "num_heads"] = heads
        out[p + "num_levels"] = levels
        out[p + "num_points"] = int(get(f"{side}_n_points", 4))
        out[p + "ffn_dim"] = int(get(f"{side}_ffn_dim", 1024))
        out[p + "activation"] = get("activation_function", "relu")
    return out


def _detect(keys: Iterable[str]) -> bool:
    keys = list(keys)
    return any(k == "model.level_embed" for k in keys) and any(k.startswith("class_embed.0.") for k in keys) and any(
        ".encoder_attn.sampling_offsets." in k for k in keys
    )


register_converter("deformable_detr", convert_hf_deformable_detr, hf_deformable_detr_overrides, _detect)
