"""DEQDet, ResNet-50, 100 queries: the official architecture (``MCG-NJU/DEQDet``,
``projects/configs/eqdet_r50_1x_coco.py``).

ResNet-50 C2-C5 (strides 4-32, stem + res2 frozen) -> a 3x3 conv + ReLU per level to 256 channels
and one GroupNorm(32) shared by all levels (``ChannelMapperWithGN``) -> 100 queries (embedding +
LayerNorm; the whole image) -> an initial AdaMixer stage and one weight-tied refinement stage
(8-head IoF-biased self-attention, 3D sampling of 4 groups x 64 points, adaptive mixing to 128
output points, FFN 2048). Training: 2 supervised extra steps after the initial stage, 20 no-grad
fixed-point steps with RAP, RAG (2 steps with gradient) + loss after steps 1, 3, 6, 9, 12, 20;
focal x2, L1 (normalised XYXY) x5, GIoU (pixels) x2 on every supervised state, Hungarian
matching with the same costs. Inference: 21 refinement steps, top 100 over queries x classes.
The pieces are ``configs/common/models/adamixer_family.py``.
"""
from detectron2.config import LazyCall as L

from d2detr.projects.deqdet.modeling import DEQDet

from .....configs.common.models.adamixer_family import backbone, criterion, neck, queries, stage, use_deqdet_decoder

use_deqdet_decoder(neck, stage)  # 3x3 conv + ReLU neck, 64 sampling points

model = L(DEQDet)(
    backbone=backbone,
    neck=neck,
    queries=queries,
    stage=stage,
    refinement_steps=20,
    supervision_steps=[1, 3, 6, 9, 12, 20],
    rag_steps=2,
    init_extra_steps=2,
    perturb_content_prob=0.2,
    perturb_content_intensity=0.1,
    perturb_position_prob=0.2,
    perturb_position_intensity=25.0,
    test_refinement_steps=21,
    checkpoint_refinement=False,
    criterion=criterion,
    num_classes=80,
    num_queries=100,
    select_box_nums_for_evaluation="${.num_queries}",
    size_divisibility=32,
)
