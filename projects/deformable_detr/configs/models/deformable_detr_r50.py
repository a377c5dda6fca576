"""Deformable DETR, ResNet-50, multi-scale (4 levels), the official architecture: the shared
multi-scale model of ``configs/common/models/deformable_r50.py`` as it is.

Variants (single-scale, box refinement, two-stage, MobileNetV2) are the sibling files, which
start from this one and change only what differs."""
from .....configs.common.models.deformable_r50 import model  # noqa: F401
