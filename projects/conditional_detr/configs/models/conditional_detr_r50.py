"""Conditional DETR R50 (the paper's model): ResNet-50 res5, 6+6 post-norm layers with
conditional cross-attention, 300 queries, focal loss.

Official hyperparameters (Atten4Vis/ConditionalDETR): d_model 256, 8 heads, FFN 2048,
dropout 0.1, 300 queries, focal loss (alpha 0.25, gamma 2) with class weight 2, L1 5,
GIoU 2 and the same matcher costs (2 / 5 / 2), top-100 over 300 queries x classes at test.
Detectron2's COCO datasets number the 80 classes contiguously, hence ``num_classes=80``
(the official code used 91 COCO category ids).
"""
from detectron2.config import LazyCall as L

from d2detr.layers import PositionEmbeddingSine
from d2detr.modeling.backbone.resnet import build_resnet
from d2detr.modeling.conditional_transformer import ConditionalDetrTransformer
from d2detr.modeling.criterion import SetCriterion
from d2detr.modeling.matcher import HungarianMatcher
from d2detr.projects.conditional_detr.modeling import ConditionalDETR

model = L(ConditionalDETR)(
    # torchvision-style ResNet: FrozenBN, stem + res2 frozen, stride in the 3x3 conv
    backbone=L(build_resnet)(depth=50, out_features=["res5"], freeze_at=2, dc5=False),
    in_feature="res5",
    position_embedding=L(PositionEmbeddingSine)(
        num_pos_feats=128, temperature=10000, normalize=True, offset=0.0
    ),
    transformer=L(ConditionalDetrTransformer)(
        d_model=256,
        nhead=8,
        num_encoder_layers=6,
        num_decoder_layers=6,
        dim_feedforward=2048,
        dropout=0.1,
        activation="relu",
        return_intermediate_dec=True,
    ),
    num_classes=80,
    num_queries=300,
    aux_loss=True,
    criterion=L(SetCriterion)(
        num_classes="${..num_classes}",
        matcher=L(HungarianMatcher)(
            cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, use_focal=True, alpha=0.25, gamma=2.0
        ),
        weight_dict={"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0},
        losses=["class", "boxes"],
        use_focal=True,
        focal_alpha=0.25,
        focal_gamma=2.0,
    ),
    pixel_mean=[123.675, 116.280, 103.530],
    pixel_std=[58.395, 57.120, 57.375],
    input_format="RGB",
    select_box_nums_for_evaluation=100,
)
