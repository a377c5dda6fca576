"""RNNDet, ResNet-50, 100 queries: DEQDet's decoder (an initial stage + one weight-tied
refinement stage, 64 input points, DEQDet's 3x3 conv + ReLU neck) unrolled ``refinement_steps``
times and trained by back-propagation through every step, each step supervised.

RNNDet has no official code; its settings are those of the DEQDet code base's FFNDet baseline
(``MCG-NJU/DEQDet``, ``projects/configs/ffndet_r50_1x_coco.py``) with the six stages tied into
the initial one + a refinement stage. ``refinement_steps = 5`` gives FFNDet's depth (NF = 6
decoder layers); the ``rnndet_r50_nf*`` configs give the other depths of the paper.
The pieces are ``configs/common/models/adamixer_family.py``.
"""
from detectron2.config import LazyCall as L

from d2detr.projects.rnndet.modeling import RNNDet

from .....configs.common.models.adamixer_family import backbone, criterion, neck, queries, stage, use_deqdet_decoder

use_deqdet_decoder(neck, stage)  # 3x3 conv + ReLU neck, 64 sampling points

model = L(RNNDet)(
    backbone=backbone,
    neck=neck,
    queries=queries,
    stage=stage,
    refinement_steps=5,
    test_refinement_steps="${.refinement_steps}",
    checkpoint_refinement=False,
    criterion=criterion,
    num_classes=80,
    num_queries=100,
    select_box_nums_for_evaluation="${.num_queries}",
    size_divisibility=32,
)
