"""Conditional DETR DC5-R101: ResNet-101 with a dilated res5 (stride 16)."""
from .conditional_detr_r50 import model

model.backbone.depth = 101
model.backbone.dc5 = True
