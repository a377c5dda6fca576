"""Conditional DETR DC5-R50: res5 dilated (stride 16 instead of 32), as in the paper's DC5 rows."""
from .conditional_detr_r50 import model

model.backbone.dc5 = True
