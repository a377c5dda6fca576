"""COCO 2017 with mmdetection's standard detection pipeline, as AdaMixer and DEQDet train their
1x (12 epoch) models (mmdet ``configs/_base_/datasets/coco_detection.py``).

Train: "coco_2017_train" without the images that have no (non-crowd) object (mmdet's
``filter_empty_gt``: 117,266 images, :data:`MMDET_COCO_TRAIN_IMAGES`), resize to 1333x800
keeping the aspect ratio (short edge 800, long edge at most 1333), horizontal flip with
probability 0.5; no multi-scale, no crop. Total batch size 16 (8 GPUs x 2).
Test: "coco_2017_val" at 1333x800, COCOEvaluator with the official pycocotools evaluation.
The models pad to a multiple of 32 themselves (``size_divisibility``), as mmdet's ``Pad``.

Their 3x / 2x schedules use DETR's multi-scale + crop augmentation instead
(``configs/common/data/coco_detr.py``; ``configs/common/adamixer_recipe.py`` sets ``filter_empty``).
"""
from detectron2.config import LazyCall as L
from detectron2.data import transforms as T

from .coco_detr import dataloader

MMDET_COCO_TRAIN_IMAGES = 117266  # coco_2017_train with filter_empty_gt

dataloader.train.dataset.filter_empty = True
dataloader.train.mapper.augmentation = [
    L(T.RandomFlip)(horizontal=True, vertical=False),
    L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333),
]
dataloader.train.mapper.augmentation_with_crop = None
