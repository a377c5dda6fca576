"""DAB-DETR R50 (the paper's model): ResNet-50 res5, 6+6 layers, 300 anchor-box queries.

Official hyperparameters (IDEA-Research/DAB-DETR): d_model 256, 8 heads, FFN 2048, dropout 0,
PReLU activations, 300 queries, sine positional encoding of the image with temperature 20
(both H and W), anchors refined by the shared box head in every layer, width/height-modulated
cross-attention; sigmoid focal loss (alpha 0.25, gamma 2), loss weights class 1 / L1 5 /
GIoU 2 and matcher costs 2 / 5 / 2 (the official ``--cls_loss_coef 1 --set_cost_class 2``);
top-300 over queries x classes at test (the official ``--num_select 300``). ``num_classes=80``: Detectron2's contiguous COCO ids.
"""
from detectron2.config import LazyCall as L

from d2detr.layers import PositionEmbeddingSine
from d2detr.modeling.backbone.resnet import build_resnet
from d2detr.modeling.criterion import SetCriterion
from d2detr.modeling.matcher import HungarianMatcher
from d2detr.projects.dab_detr.modeling import DABDETR, DabDetrTransformer

model = L(DABDETR)(
    backbone=L(build_resnet)(depth=50, out_features=["res5"], freeze_at=2, dc5=False),
    in_feature="res5",
    position_embedding=L(PositionEmbeddingSine)(
        num_pos_feats=128, temperature=20, normalize=True, offset=0.0
    ),
    transformer=L(DabDetrTransformer)(
        d_model=256,
        nhead=8,
        num_encoder_layers=6,
        num_decoder_layers=6,
        dim_feedforward=2048,
        dropout=0.0,
        activation="prelu",
        num_patterns=0,
        keep_query_pos=False,
        modulate_hw_attn=True,
        return_intermediate_dec=True,
    ),
    num_classes=80,
    num_queries=300,
    aux_loss=True,
    random_refpoints_xy=False,
    iter_update=True,
    criterion=L(SetCriterion)(
        num_classes="${..num_classes}",
        matcher=L(HungarianMatcher)(
            cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, use_focal=True, alpha=0.25, gamma=2.0
        ),
        weight_dict={"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0},
        losses=["class", "boxes"],
        use_focal=True,
        focal_alpha=0.25,
        focal_gamma=2.0,
    ),
    pixel_mean=[123.675, 116.280, 103.530],
    pixel_std=[58.395, 57.120, 57.375],
    input_format="RGB",
    select_box_nums_for_evaluation=300,
)
