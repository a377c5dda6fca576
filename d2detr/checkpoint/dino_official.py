"""Official DINO checkpoints (IDEA-Research/DINO, e.g. ``checkpoint0011_4scale.pth``) -> d2detr ``DINO``.

The official model's module layout is kept, so the conversion is a renaming, one tensor to one:

=====================================  =========================================
official                               d2detr
=====================================  =========================================
``backbone.0.body.*`` (torchvision)    ``backbone.*`` (Detectron2 ResNet names)
``input_proj.{l}.{0,1}``               ``neck.input_proj.{l}.{0,1}``
``label_enc.weight``                   ``denoising.label_enc.weight``
``transformer.*``, ``class_embed.*``,  the same names
``bbox_embed.*``
=====================================  =========================================

The official heads have ``num_classes = 91`` (COCO category ids as indices) and the label
embedding ``dn_labelbook_size + 1 = 92`` rows; ``classes="auto"`` / ``"coco80"`` keep the rows of
Detectron2's 80 contiguous COCO classes (and the label embedding's last row), ``"keep"`` all 91.
"""
from typing import Any, Dict, Iterable

import torch

from . import StateDictMapper, coco91_to_contiguous_rows, register_converter, resolve_classes_option, select_class_rows
from .official import _backbone, _layers, _resnet_depth

__all__ = ["convert_official_dino", "official_dino_overrides"]

_BACKBONE = "backbone.0.body."
# class heads: every decoder layer's (shared), the decoder's view of them and the proposal head
_CLASS_HEADS = ("class_embed.", "transformer.decoder.class_embed.", "transformer.enc_out_class_embed.")


def _is_class_head(key: str) -> bool:
    return any(key.startswith(p) for p in _CLASS_HEADS)


def _num_labels(sd) -> int:
    return int(sd["transformer.enc_out_class_embed.weight"].shape[0])


def convert_official_dino(state_dict, config=None, classes: str = "auto", **_) -> Dict[str, torch.Tensor]:
    """Official DINO ``model`` state dict -> d2detr ``DINO`` state dict (see the module docstring)."""
    if "label_enc.weight" not in state_dict or "transformer.tgt_embed.weight" not in state_dict:
        raise KeyError("not an official DINO checkpoint: no label_enc.weight / transformer.tgt_embed.weight")
    mode = resolve_classes_option(classes, config or {}, _num_labels(state_dict))
    m = StateDictMapper(state_dict)
    m.out.update(_backbone(state_dict, _BACKBONE))
    m.used.update(k for k in state_dict if k.startswith(_BACKBONE))
    rows = coco91_to_contiguous_rows()
    for key, value in state_dict.items():
        if key.startswith(_BACKBONE):
            continue
        if key.startswith("input_proj."):
            m.take(key, "neck." + key)
        elif key == "label_enc.weight":
            # rows are class ids; the extra last row is the unused "unknown" label of DN-DETR
            m.out["denoising.label_enc.weight"] = (
                select_class_rows(value, rows, extra_last=True) if mode == "coco80" else value
            )
            m.used.add(key)
        elif _is_class_head(key) and mode == "coco80":
            m.out[key] = select_class_rows(value, rows, extra_last=False)
            m.used.add(key)
        else:
            m.take(key, key)
    return m.check_all_used("official DINO")


def official_dino_overrides(config=None, state_dict=None, classes: str = "auto", **_) -> Dict[str, Any]:
    """The overrides of ``projects/dino/configs/models/dino_r50_4scale.py`` that build the
    checkpoint's model: classes, denoising label book, queries, depth, layers. A 5-scale checkpoint
    (5 entries in ``transformer.level_embed``) needs the ``*_5scale`` config."""
    sd = state_dict
    num_labels = _num_labels(sd)
    book = int(sd["label_enc.weight"].shape[0]) - 1
    if resolve_classes_option(classes, config or {}, num_labels) == "coco80":
        num_labels, book = 80, 80
    return {
        "model.num_classes": num_labels,
        "model.denoising.label_book_size": book,
        "model.num_queries": int(sd["transformer.tgt_embed.weight"].shape[0]),
        "model.backbone.depth": _resnet_depth(sd, _BACKBONE),
        "model.transformer.encoder.num_layers": _layers(sd, "transformer.encoder.layers."),
        "model.transformer.decoder.num_layers": _layers(sd, "transformer.decoder.layers."),
    }


def _detect_official_dino(keys: Iterable[str]) -> bool:
    keys = set(keys)
    return {"label_enc.weight", "transformer.tgt_embed.weight", "transformer.enc_out_class_embed.weight"} <= keys


register_converter("dino_official", convert_official_dino, official_dino_overrides, _detect_official_dino)
