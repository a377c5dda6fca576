"""The pieces AdaMixer, RNNDet and DEQDet share, at AdaMixer's official settings
(``MCG-NJU/AdaMixer``, ``configs/adamixer/adamixer_r50_1x_coco.py``); each method's model config
composes them and changes what its paper changes (DEQDet: 3x3 conv + ReLU neck, 64 points).

- ``backbone``: ResNet-50 C2-C5 (strides 4, 8, 16, 32), stem + res2 frozen (mmdet frozen_stages=1).
- ``neck``: a 1x1 conv per level to 256 channels, one GroupNorm(32) shared by the levels.
- ``queries``: ``num_queries`` content embeddings (+ LayerNorm) at the whole image.
- ``stage``: one AdaMixer stage (256 wide, 8 heads, FFN 2048, 4 groups x 32 -> 128 points).
- ``criterion``: Hungarian matching (focal 2, L1 5, GIoU 2) and the same loss weights, the L1
  cost and loss between XYXY boxes (mmdet's ``BBoxL1Cost(box_format="xyxy")`` and ``L1Loss`` on
  decoded boxes; their GIoU on pixel boxes equals the GIoU of normalised boxes).

``${..num_classes}`` / ``${..num_queries}`` resolve against the model that holds the pieces.
"""
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from d2detr.modeling.adamixer import AdaMixerQueryInit, AdaMixerStage
from d2detr.modeling.backbone import build_resnet
from d2detr.modeling.criterion import SetCriterion
from d2detr.modeling.matcher import HungarianMatcher
from d2detr.modeling.neck import ChannelMapper

LEVELS = ["res2", "res3", "res4", "res5"]

backbone = L(build_resnet)(depth=50, out_features=LEVELS, freeze_at=2)

neck = L(ChannelMapper)(
    input_shapes={
        "res2": L(ShapeSpec)(channels=256, stride=4),
        "res3": L(ShapeSpec)(channels=512, stride=8),
        "res4": L(ShapeSpec)(channels=1024, stride=16),
        "res5": L(ShapeSpec)(channels=2048, stride=32),
    },
    in_features=LEVELS,
    out_channels=256,
    num_outs=4,
    kernel_size=1,
    norm="shared_GN",
    num_groups=32,
    activation="",
)

queries = L(AdaMixerQueryInit)(num_queries="${..num_queries}", content_dim=256)

stage = L(AdaMixerStage)(
    num_classes="${..num_classes}",
    content_dim=256,
    feat_channels=256,
    num_heads=8,
    ffn_dim=2048,
    in_points=32,
    out_points=128,
    num_groups=4,
    num_cls_fcs=1,
    num_reg_fcs=1,
    dropout=0.0,
)

criterion = L(SetCriterion)(
    num_classes="${..num_classes}",
    matcher=L(HungarianMatcher)(
        cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, use_focal=True, alpha=0.25, gamma=2.0, l1_box_format="xyxy"
    ),
    weight_dict={"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0},
    losses=["class", "boxes"],
    use_focal=True,
    focal_alpha=0.25,
    focal_gamma=2.0,
    l1_box_format="xyxy",
)


def use_deqdet_decoder(neck, stage):
    """What the DEQDet code base (DEQDet, and its FFNDet / RNNDet baselines) changes in these
    pieces: a 3x3 conv + ReLU per neck level (``ChannelMapperWithGN``) and 64 sampling points."""
    neck.kernel_size = 3
    neck.activation = "relu"
    stage.in_points = 64
