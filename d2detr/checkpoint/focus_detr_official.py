"""Official Focus-DETR checkpoints (the PyTorch release, huawei-noah/noah-research ``Focus-DETR``
and detrex's ``projects/focus_detr``, e.g. ``focus_detr_r50_4scale_12ep.pth``) -> d2detr ``FocusDETR``.

The release is built on detrex's Detectron2 modules, so most names carry over; the renaming is
one tensor to one:

============================================================  ===================================================
release                                                       d2detr
============================================================  ===================================================
``backbone.*`` (Detectron2 ResNet)                            the same names
``neck.convs.{l}.{conv,norm}``                                ``neck.input_proj.{l}.{0,1}``
``neck.extra_convs.{j}.{conv,norm}``                          ``neck.input_proj.{levels_in + j}.{0,1}``
``transformer.level_embeds``                                  ``transformer.level_embed``
``transformer.alpha``                                         ``transformer.foreground_selector.alpha``
``transformer.enc_mask_predictor.layer1.{0,1}``               ``transformer.foreground_selector.predictor.embed.{0,1}``
``transformer.enc_mask_predictor.layer2.{0,2,4}``             ``transformer.foreground_selector.predictor.mlp.{0,2,4}``
``transformer.encoder.layers.{i}.attentions.0.attn``          ``transformer.encoder.layers.{i}.dual_attn``
``transformer.encoder.layers.{i}.attentions.1``               ``transformer.encoder.layers.{i}.self_attn`` (deformable)
``transformer.encoder.layers.{i}.norm2`` / ``norms.0/1``      ``dual_norm`` / ``norm1`` / ``norm2``
``transformer.decoder.layers.{i}.attentions.0.attn`` / ``.1``  ``self_attn`` / ``cross_attn``
``transformer.decoder.layers.{i}.norms.0/1/2``                ``norm2`` / ``norm1`` / ``norm3``
``...layers.{i}.ffns.0.layers.0.0`` / ``.layers.1``           ``linear1`` / ``linear2``
``label_enc.weight``                                          ``denoising.label_enc.weight``
``transformer.{tgt_embed,enc_output,enc_output_norm}``,       the same names
``transformer.decoder.{ref_point_head,norm}``, ``class_embed``,
``bbox_embed`` (and the decoder's views of them)
============================================================  ===================================================

``transformer.encoder.enhance_MCSP.{i}`` are the release's views of the proposal class head
(``class_embed.{num_decoder_layers}``) for the dual attention, not weights of their own: they must
equal it and are left out (d2detr passes that head to the encoder). The heads have Detectron2's
80 contiguous COCO classes and the label embedding one row per class (no "unknown" row), so there
is no class remapping.
"""
import re
from typing import Any, Dict, Iterable

import torch

from . import StateDictMapper, num_indexed, register_converter

__all__ = ["convert_official_focus_detr", "official_focus_detr_overrides"]

_DEPTH_BY_RES4_BLOCKS = {2: 18, 6: 50, 23: 101, 36: 152}
_LAYER_RENAMES = {
    "encoder": [(r"attentions\.0\.attn\.", "dual_attn."), (r"attentions\.1\.", "self_attn."),
                (r"norm2\.", "dual_norm."), (r"norms\.0\.", "norm1."), (r"norms\.1\.", "norm2.")],
    "decoder": [(r"attentions\.0\.attn\.", "self_attn."), (r"attentions\.1\.", "cross_attn."),
                (r"norms\.0\.", "norm2."), (r"norms\.1\.", "norm1."), (r"norms\.2\.", "norm3.")],
}
_FFN_RENAMES = [(r"ffns\.0\.layers\.0\.0\.", "linear1."), (r"ffns\.0\.layers\.1\.", "linear2.")]
_PREDICTOR = "transformer.enc_mask_predictor."
_SELECTOR = "transformer.foreground_selector."


def _rename_layer_key(key: str) -> str:
    m = re.match(r"(transformer\.(encoder|decoder)\.layers\.\d+\.)(.*)", key)
    if m is None:
        return key
    prefix, stack, rest = m.groups()
    for pattern, new in _LAYER_RENAMES[stack] + _FFN_RENAMES:
        if re.match(pattern, rest):
            return prefix + re.sub("^" + pattern, new, rest)
    raise KeyError(f"official Focus-DETR: unknown {stack} layer tensor {key!r}")


def _rename(key: str, levels_in: int) -> str:
    m = re.match(r"neck\.(convs|extra_convs)\.(\d+)\.(conv|norm)\.(.*)", key)
    if m:
        kind, idx, part, rest = m.groups()
        level = int(idx) + (levels_in if kind == "extra_convs" else 0)
        return f"neck.input_proj.{level}.{0 if part == 'conv' else 1}.{rest}"
    if key == "transformer.level_embeds":
        return "transformer.level_embed"
    if key == "transformer.alpha":
        return _SELECTOR + "alpha"
    if key.startswith(_PREDICTOR):
        rest = key[len(_PREDICTOR):]
        rest = re.sub(r"^layer1\.", "embed.", rest)
        rest = re.sub(r"^layer2\.", "mlp.", rest)
        return _SELECTOR + "predictor." + rest
    if key == "label_enc.weight":
        return "denoising.label_enc.weight"
    return _rename_layer_key(key)


def convert_official_focus_detr(state_dict, config=None, **_) -> Dict[str, torch.Tensor]:
    """Official Focus-DETR ``model`` state dict -> d2detr ``FocusDETR`` state dict (see the module docstring)."""
    if not _detect_official_focus_detr(state_dict):
        raise KeyError("not an official Focus-DETR checkpoint: no transformer.enc_mask_predictor.* / transformer.alpha")
    num_decoder_layers = num_indexed(state_dict, "transformer.decoder.layers.")
    proposal_head = f"class_embed.{num_decoder_layers}."
    levels_in = num_indexed(state_dict, "neck.convs.")
    m = StateDictMapper(state_dict)
    for key in state_dict:
        if key.startswith("transformer.encoder.enhance_MCSP."):
            # a view of the proposal class head: check it is one, then leave it out
            own = proposal_head + key.split(".", 4)[4]
            if own not in state_dict or not torch.equal(state_dict[key], state_dict[own]):
                raise ValueError(f"official Focus-DETR: {key} is not the proposal class head {own}")
            m.used.add(key)
            continue
        m.take(key, _rename(key, levels_in))
    return m.check_all_used("official Focus-DETR")


def official_focus_detr_overrides(config=None, state_dict=None, **_) -> Dict[str, Any]:
    """The overrides of ``projects/focus_detr/configs/models/focus_detr_r50.py`` that build the
    checkpoint's model: classes, queries, depth, layers."""
    sd = state_dict
    res4 = num_indexed(sd, "backbone.res4.")
    if res4 not in _DEPTH_BY_RES4_BLOCKS:
        raise ValueError(f"official Focus-DETR: cannot tell the ResNet depth from {res4} res4 blocks")
    return {
        "model.num_classes": int(sd["class_embed.0.weight"].shape[0]),
        "model.num_queries": int(sd["transformer.tgt_embed.weight"].shape[0]),
        "model.backbone.depth": _DEPTH_BY_RES4_BLOCKS[res4],
        "model.transformer.encoder.num_layers": num_indexed(sd, "transformer.encoder.layers."),
        "model.transformer.decoder.num_layers": num_indexed(sd, "transformer.decoder.layers."),
    }


def _detect_official_focus_detr(keys: Iterable[str]) -> bool:
    keys = set(keys)
    return "transformer.alpha" in keys and any(k.startswith(_PREDICTOR) for k in keys)


register_converter("focus_detr_official", convert_official_focus_detr, official_focus_detr_overrides,
                   _detect_official_focus_detr)
