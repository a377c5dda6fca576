"""SD-DETR R50: Conditional DETR (ResNet-50 res5, 6+6 post-norm layers, 300 queries) with a
mini-detector, decoupled feature learning, task-aware queries and the task-alignment loss.

Conditional DETR's official hyperparameters (Atten4Vis/ConditionalDETR), which the paper builds on:
d_model 256, 8 heads, FFN 2048, dropout 0.1, 300 queries, matcher costs class 2 / L1 5 / GIoU 2
(focal cost, alpha 0.25, gamma 2), loss weights 2 / 5 / 2, top-100 at test. What the paper leaves
open is chosen and explained in projects/sd_detr/README.md ("Decisions").

The ablation of the paper's Tables 2 and 3, row by row (overrides of this config):

    baseline (Conditional DETR + mini-detector): model.transformer.decoupling=none
        model.transformer.task_aware_queries=False model.criterion.alignment_loss=False
    + decoupled feature learning:                model.transformer.task_aware_queries=False
        model.criterion.alignment_loss=False
    + task-aware queries:                        model.criterion.alignment_loss=False
    + alignment loss (SD-DETR):                  (this file)
    Table 3, full decoder copy instead of DFL:   model.transformer.decoupling=full
        model.transformer.task_aware_queries=False model.criterion.alignment_loss=False

Detectron2's COCO datasets number the 80 classes contiguously, hence ``num_classes=80``.
"""
from detectron2.config import LazyCall as L

from d2detr.layers import PositionEmbeddingSine
from d2detr.modeling.backbone.resnet import build_resnet
from d2detr.modeling.matcher import HungarianMatcher
from d2detr.projects.sd_detr.modeling import SDDETR, SDDETRCriterion, SDDetrTransformer

model = L(SDDETR)(
    # torchvision-style ResNet: FrozenBN, stem + res2 frozen, stride in the 3x3 conv
    backbone=L(build_resnet)(depth=50, out_features=["res5"], freeze_at=2, dc5=False),
    in_feature="res5",
    position_embedding=L(PositionEmbeddingSine)(
        num_pos_feats=128, temperature=10000, normalize=True, offset=0.0
    ),
    transformer=L(SDDetrTransformer)(
        d_model=256,
        nhead=8,
        num_encoder_layers=6,
        num_decoder_layers=6,
        dim_feedforward=2048,
        dropout=0.1,
        activation="relu",
        # ---- ablation flags 1 and 2
        decoupling="cross_attention",  # "none" (baseline) | "cross_attention" (DFL) | "full" (Table 3)
        task_aware_queries=True,
        num_points=8,  # discriminative points per branch (SAM-DETR: one per head)
        roi_size=7,  # RoIAlign output (SAM-DETR)
        anchor_scale=0.2,  # mini-detector's initial proposal size (two-stage Deformable DETR, stride 32)
    ),
    num_classes=80,
    num_queries=300,
    aux_loss=True,
    criterion=L(SDDETRCriterion)(
        num_classes="${..num_classes}",
        matcher=L(HungarianMatcher)(
            cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, use_focal=True, alpha=0.25, gamma=2.0
        ),
        weight_dict={"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0},
        losses=["class", "boxes"],
        use_focal=True,
        focal_alpha=0.25,
        focal_gamma=2.0,
        # ---- ablation flag 3: the task-alignment loss (TOOD's alpha 1, beta 6, gamma 2)
        alignment_loss=True,
        alignment_alpha=1.0,
        alignment_beta=6.0,
        alignment_gamma=2.0,
        normalize_alignment=True,
        positive_repeats=2,  # ground-truth copies in the auxiliary layers' matching (Align-DETR's k)
    ),
    pixel_mean=[123.675, 116.280, 103.530],
    pixel_std=[58.395, 57.120, 57.375],
    input_format="RGB",
    select_box_nums_for_evaluation=100,
)
