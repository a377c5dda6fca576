"""Deformable DETR + iterative bounding box refinement."""
from .deformable_detr_r50 import model

model.with_box_refine = True
