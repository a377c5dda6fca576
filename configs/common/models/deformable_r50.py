"""The multi-scale deformable R50 model every deformable method starts from: Deformable DETR,
ResNet-50, 4 levels, the official architecture (fundamentalvision/Deformable-DETR).

``projects/deformable_detr/configs/models/deformable_detr_r50.py`` is this model; Deformable DETR's
variants (single-scale, box refinement, two-stage, MobileNetV2) and its successors
(DAB-Deformable-DETR, DINO, Focus-DETR) start from it and change only what differs."""
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from d2detr.layers.position_encoding import PositionEmbeddingSine
from d2detr.modeling.backbone import build_resnet
from d2detr.modeling.criterion import SetCriterion
from d2detr.modeling.deformable_transformer import (
    DeformableDetrTransformer,
    DeformableTransformerDecoder,
    DeformableTransformerDecoderLayer,
    DeformableTransformerEncoder,
    DeformableTransformerEncoderLayer,
)
from d2detr.modeling.matcher import HungarianMatcher
from d2detr.modeling.meta_arch.deformable_detr import DeformableDETR
from d2detr.modeling.neck import ChannelMapper

model = L(DeformableDETR)(
    backbone=L(build_resnet)(depth=50, out_features=["res3", "res4", "res5"], freeze_at=2),
    neck=L(ChannelMapper)(
        input_shapes={
            "res3": L(ShapeSpec)(channels=512, stride=8),
            "res4": L(ShapeSpec)(channels=1024, stride=16),
            "res5": L(ShapeSpec)(channels=2048, stride=32),
        },
        in_features=["res3", "res4", "res5"],
        out_channels=256,
        num_outs=4,  # + a stride-64 level (3x3/s2 conv on res5)
        kernel_size=1,
        norm="GN",
        num_groups=32,
    ),
    position_embedding=L(PositionEmbeddingSine)(
        num_pos_feats=128, temperature=10000, normalize=True, offset=-0.5
    ),
    transformer=L(DeformableDetrTransformer)(
        encoder=L(DeformableTransformerEncoder)(
            encoder_layer=L(DeformableTransformerEncoderLayer)(
                embed_dim=256, num_heads=8, num_levels=4, num_points=4, ffn_dim=1024, dropout=0.1
            ),
            num_layers=6,
        ),
        decoder=L(DeformableTransformerDecoder)(
            decoder_layer=L(DeformableTransformerDecoderLayer)(
                embed_dim=256, num_heads=8, num_levels=4, num_points=4, ffn_dim=1024, dropout=0.1
            ),
            num_layers=6,
            return_intermediate=True,
        ),
        embed_dim=256,
        num_feature_levels=4,
        two_stage=False,
        two_stage_num_proposals="${..num_queries}",
    ),
    criterion=L(SetCriterion)(
        num_classes="${..num_classes}",
        matcher=L(HungarianMatcher)(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, use_focal=True, alpha=0.25, gamma=2.0),
        weight_dict={"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0},
        losses=["class", "boxes"],
        use_focal=True,
        focal_alpha=0.25,
        focal_gamma=2.0,
    ),
    num_classes=80,
    num_queries=300,
    embed_dim=256,
    aux_loss=True,
    with_box_refine=False,
    select_box_nums_for_evaluation=100,
)
