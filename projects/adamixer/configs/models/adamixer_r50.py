"""AdaMixer, ResNet-50, 100 queries: the official architecture (``MCG-NJU/AdaMixer``,
``configs/adamixer/adamixer_r50_1x_coco.py``).

ResNet-50 C2-C5 (strides 4-32, stem + res2 frozen) -> a 1x1 conv per level to 256 channels and one
GroupNorm(32) shared by all levels (``ChannelMapping``) -> 100 queries (content: embedding +
LayerNorm; position: the whole image) -> 6 AdaMixer stages (8-head IoF-biased self-attention,
3D sampling of 4 groups x 32 points, adaptive mixing to 128 output points, FFN 2048), each
supervised with focal loss x2, L1 (normalised XYXY) x5 and GIoU (pixels) x2 after Hungarian
matching with the same costs. Inference: top 100 over queries x classes.
The pieces are ``configs/common/models/adamixer_family.py``.
"""
from detectron2.config import LazyCall as L

from d2detr.projects.adamixer.modeling import AdaMixer

from .....configs.common.models.adamixer_family import backbone, criterion, neck, queries, stage

model = L(AdaMixer)(
    backbone=backbone,
    neck=neck,
    queries=queries,
    stage=stage,
    num_stages=6,
    criterion=criterion,
    num_classes=80,
    num_queries=100,
    select_box_nums_for_evaluation="${.num_queries}",
    size_divisibility=32,
)
