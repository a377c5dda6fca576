"""Two-stage Deformable DETR (with box refinement, as the official two-stage model)."""
from .deformable_detr_r50 import model

model.with_box_refine = True
model.transformer.two_stage = True
