"""Deformable DETR (single-scale, multi-scale, + iterative box refinement, + two-stage).

Importable as ``d2detr.projects.deformable_detr``."""
from .modeling import DeformableDETR, DeformableDetrTransformer

__all__ = ["DeformableDETR", "DeformableDetrTransformer"]
