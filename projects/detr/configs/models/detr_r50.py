"""DETR R50 (the paper's model): ResNet-50 res5, 6+6 post-norm layers, 100 queries.

Detectron2's COCO datasets number the 80 classes contiguously, hence
``num_classes=80`` (the official code used 91 COCO category ids; see
``tools/convert_checkpoint.py`` for converting such heads).
"""
from detectron2.config import LazyCall as L

from d2detr.layers import PositionEmbeddingSine
from d2detr.modeling.backbone.resnet import build_resnet
from d2detr.modeling.criterion import SetCriterion
from d2detr.modeling.matcher import HungarianMatcher
from d2detr.modeling.transformer import DetrTransformer
from d2detr.projects.detr.modeling import DETR

model = L(DETR)(
    # torchvision-style ResNet: FrozenBN, stem + res2 frozen, stride in the 3x3 conv
    backbone=L(build_resnet)(depth=50, out_features=["res5"], freeze_at=2, dc5=False),
    in_feature="res5",
    position_embedding=L(PositionEmbeddingSine)(
        num_pos_feats=128, temperature=10000, normalize=True, offset=0.0
    ),
    transformer=L(DetrTransformer)(
        d_model=256,
        nhead=8,
        num_encoder_layers=6,
        num_decoder_layers=6,
        dim_feedforward=2048,
        dropout=0.1,
        activation="relu",
        normalize_before=False,
        return_intermediate_dec=True,
    ),
    num_classes=80,
    num_queries=100,
    aux_loss=True,
    criterion=L(SetCriterion)(
        num_classes="${..num_classes}",
        matcher=L(HungarianMatcher)(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0),
        weight_dict={"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0},
        losses=["class", "boxes"],
        eos_coef=0.1,
    ),
    pixel_mean=[123.675, 116.280, 103.530],
    pixel_std=[58.395, 57.120, 57.375],
    input_format="RGB",
    select_box_nums_for_evaluation=100,
)
