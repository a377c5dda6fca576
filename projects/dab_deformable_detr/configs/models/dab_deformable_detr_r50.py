"""DAB-Deformable-DETR R50: Deformable DETR (4 levels, 8 heads, 4 points, 6+6 layers) with
300 learned anchor-box queries, refined layer by layer.

Official DAB-DETR repository hyperparameters for ``-m dab_deformable_detr``: FFN 2048,
dropout 0, ReLU, 300 queries, iterative box refinement; sigmoid focal loss (alpha 0.25, gamma
2) with weights class 1 / L1 5 / GIoU 2 and matcher costs 2 / 5 / 2. The encoder, neck and
positional encoding (offset -0.5, temperature 10000) are Deformable DETR's.
"""
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from d2detr.layers.position_encoding import PositionEmbeddingSine
from d2detr.modeling.backbone import build_resnet
from d2detr.modeling.criterion import SetCriterion
from d2detr.modeling.deformable_transformer import (
    DeformableTransformerDecoderLayer,
    DeformableTransformerEncoder,
    DeformableTransformerEncoderLayer,
)
from d2detr.modeling.matcher import HungarianMatcher
from d2detr.modeling.neck import ChannelMapper
from d2detr.projects.dab_deformable_detr.modeling import (
    DABDeformableDETR,
    DabDeformableDecoder,
    DabDeformableDetrTransformer,
)

model = L(DABDeformableDETR)(
    backbone=L(build_resnet)(depth=50, out_features=["res3", "res4", "res5"], freeze_at=2),
    neck=L(ChannelMapper)(
        input_shapes={
            "res3": L(ShapeSpec)(channels=512, stride=8),
            "res4": L(ShapeSpec)(channels=1024, stride=16),
            "res5": L(ShapeSpec)(channels=2048, stride=32),
        },
        in_features=["res3", "res4", "res5"],
        out_channels=256,
        num_outs=4,
        kernel_size=1,
        norm="GN",
        num_groups=32,
    ),
    position_embedding=L(PositionEmbeddingSine)(
        num_pos_feats=128, temperature=10000, normalize=True, offset=-0.5
    ),
    transformer=L(DabDeformableDetrTransformer)(
        encoder=L(DeformableTransformerEncoder)(
            encoder_layer=L(DeformableTransformerEncoderLayer)(
                embed_dim=256, num_heads=8, num_levels=4, num_points=4, ffn_dim=2048, dropout=0.0
            ),
            num_layers=6,
        ),
        decoder=L(DabDeformableDecoder)(
            decoder_layer=L(DeformableTransformerDecoderLayer)(
                embed_dim=256, num_heads=8, num_levels=4, num_points=4, ffn_dim=2048, dropout=0.0
            ),
            num_layers=6,
            embed_dim=256,
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
        weight_dict={"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0},
        losses=["class", "boxes"],
        use_focal=True,
        focal_alpha=0.25,
        focal_gamma=2.0,
    ),
    num_classes=80,
    num_queries=300,
    embed_dim=256,
    aux_loss=True,
    with_box_refine=True,
    random_refpoints_xy=False,
    select_box_nums_for_evaluation=100,
)
