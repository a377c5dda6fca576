"""Tiny LazyConfig files of every method, shared by the export, ONNX and tool tests.

Each entry of :data:`TINY_METHODS` is the real model config of a method made tiny (MobileNetV2
backbone without pretrained weights, a narrow transformer, few queries), so every model runs in
well under a second on a CPU. A new method adds its entry here and is then exported, run and
drawn by every test that iterates over ``TINY_METHODS``.
"""
import os
import textwrap

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_MOBILENET_RES5 = """
from d2detr.modeling.backbone import MobileNetV2Backbone
model.backbone = L(MobileNetV2Backbone)(out_features=["res5"], pretrained=False)
"""
_SMALL_DETR_TRANSFORMER = """
model.position_embedding.num_pos_feats = 16
model.transformer.d_model = 32
model.transformer.nhead = 4
model.transformer.num_encoder_layers = 1
model.transformer.num_decoder_layers = 2
model.transformer.dim_feedforward = 64
model.num_queries = 12
"""
_SMALL_DEFORMABLE = """
model.backbone.pretrained = False
model.num_queries = 12
model.transformer.encoder.num_layers = 1
model.transformer.decoder.num_layers = 2
model.transformer.encoder.encoder_layer.ffn_dim = 64
model.transformer.decoder.decoder_layer.ffn_dim = 64
"""
_SMALL_MULTI_SCALE = """
from detectron2.layers import ShapeSpec
from d2detr.modeling.backbone import MobileNetV2Backbone
model.backbone = L(MobileNetV2Backbone)(out_features=["res3", "res4", "res5"], pretrained=False)
model.neck.input_shapes = {
    "res3": L(ShapeSpec)(channels=32, stride=8),
    "res4": L(ShapeSpec)(channels=96, stride=16),
    "res5": L(ShapeSpec)(channels=320, stride=32),
}
model.neck.out_channels = 64
model.neck.num_outs = 3
model.position_embedding.num_pos_feats = 32
model.embed_dim = 64
model.num_queries = 12
model.transformer.embed_dim = 64
model.transformer.num_feature_levels = 3
model.transformer.encoder.num_layers = 1
model.transformer.decoder.num_layers = 2
model.transformer.decoder.embed_dim = 64
for layer in (model.transformer.encoder.encoder_layer, model.transformer.decoder.decoder_layer):
    layer.embed_dim = 64
    layer.num_heads = 4
    layer.num_levels = 3
    layer.ffn_dim = 64
"""

_SMALL_ADAMIXER_FAMILY = """
from detectron2.layers import ShapeSpec
from d2detr.modeling.backbone import MobileNetV2Backbone
model.backbone = L(MobileNetV2Backbone)(out_features=["res3", "res4", "res5"], pretrained=False)
model.neck.input_shapes = {
    "res3": L(ShapeSpec)(channels=32, stride=8),
    "res4": L(ShapeSpec)(channels=96, stride=16),
    "res5": L(ShapeSpec)(channels=320, stride=32),
}
model.neck.in_features = ["res3", "res4", "res5"]
model.neck.out_channels = 32
model.neck.num_outs = 3
model.queries.content_dim = 32
model.stage.content_dim = 32
model.stage.feat_channels = 32
model.stage.num_heads = 4
model.stage.ffn_dim = 64
model.stage.out_points = 8
model.num_queries = 12
"""

# method -> (model config relative to the repo, extra config lines)
TINY_METHODS = {
    "detr": ("projects/detr/configs/models/detr_r50.py", _MOBILENET_RES5 + _SMALL_DETR_TRANSFORMER),
    "conditional_detr": (
        "projects/conditional_detr/configs/models/conditional_detr_r50.py",
        _MOBILENET_RES5 + _SMALL_DETR_TRANSFORMER,
    ),
    "dab_detr": ("projects/dab_detr/configs/models/dab_detr_r50.py", _MOBILENET_RES5 + _SMALL_DETR_TRANSFORMER),
    "dab_deformable_detr": (
        "projects/dab_deformable_detr/configs/models/dab_deformable_detr_r50.py",
        _SMALL_MULTI_SCALE,
    ),
    "dab_deformable_detr_two_stage": (
        "projects/dab_deformable_detr/configs/models/dab_deformable_detr_two_stage_r50.py",
        _SMALL_MULTI_SCALE,
    ),
    "deformable_detr": ("projects/deformable_detr/configs/models/deformable_detr_mobilenetv2.py", _SMALL_DEFORMABLE),
    "dino": (
        "projects/dino/configs/models/dino_r50_4scale.py",
        _SMALL_MULTI_SCALE + "model.transformer.decoder.norm.normalized_shape = 64\nmodel.denoising.embed_dim = 64\n",
    ),
    "focus_detr": (
        "projects/focus_detr/configs/models/focus_detr_r50.py",
        _SMALL_MULTI_SCALE + "model.transformer.decoder.norm.normalized_shape = 64\nmodel.denoising.embed_dim = 64\n"
        "model.transformer.encoder.cascade_ratios = [1.0]\nmodel.transformer.encoder.encoder_layer.num_dual_tokens = 8\n"
        "model.criterion.foreground_strides = [8, 16, 32]\n"
        "model.criterion.foreground_ranges = [[-1, 64], [64, 128], [128, float('inf')]]\n",
    ),
    "sd_detr": ("projects/sd_detr/configs/models/sd_detr_r50.py", _MOBILENET_RES5 + _SMALL_DETR_TRANSFORMER),
    "deformable_detr_refine": (
        "projects/deformable_detr/configs/models/deformable_detr_mobilenetv2.py",
        _SMALL_DEFORMABLE + "model.with_box_refine = True\n",
    ),
    "deformable_detr_two_stage": (
        "projects/deformable_detr/configs/models/deformable_detr_mobilenetv2.py",
        _SMALL_DEFORMABLE + "model.with_box_refine = True\nmodel.transformer.two_stage = True\n",
    ),
    "adamixer": (
        "projects/adamixer/configs/models/adamixer_r50.py",
        _SMALL_ADAMIXER_FAMILY + "model.stage.in_points = 6\nmodel.num_stages = 2\n",
    ),
    "rnndet": (
        "projects/rnndet/configs/models/rnndet_r50.py",
        _SMALL_ADAMIXER_FAMILY + "model.stage.in_points = 4\nmodel.refinement_steps = 2\n",
    ),
    "deqdet": (
        "projects/deqdet/configs/models/deqdet_r50.py",
        _SMALL_ADAMIXER_FAMILY + "model.stage.in_points = 4\nmodel.refinement_steps = 3\n"
        "model.supervision_steps = [1, 3]\nmodel.test_refinement_steps = 3\n",
    ),
}


def write_tiny_config(tmp_path, method, num_classes=3, extra=""):
    """A LazyConfig file with only ``model``: ``method``'s model config made tiny."""
    base, lines = TINY_METHODS[method]
    base = os.path.join(REPO, base)
    if not os.path.isfile(base):
        pytest.skip(f"{method}: {base} is not in the tree yet")
    text = (
        "from detectron2.config import LazyCall as L, LazyConfig\n"
        f"model = LazyConfig.load({base!r}).model\n"
        + textwrap.dedent(lines)
        + f"model.num_classes = {num_classes}\nmodel.select_box_nums_for_evaluation = 10\n"
        + textwrap.dedent(extra)
    )
    path = os.path.join(str(tmp_path), f"tiny_{method}.py")
    with open(path, "w") as f:
        f.write(text)
    return path


def build_tiny(config, seed=0):
    """(model in eval mode, path of its saved weights) for a tiny config file."""
    from d2detr.export.cli import build_model, load_config

    torch.manual_seed(seed)
    model = build_model(load_config(config), "cpu")
    weights = os.path.join(os.path.dirname(config), "weights.pth")
    torch.save(model.state_dict(), weights)
    return model, weights


def random_image(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
