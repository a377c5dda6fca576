"""Conditional DETR R101, 108 epochs (paper: 44.5 AP). Recipe of conditional_detr_r50_108ep."""
from .conditional_detr_r50_108ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.depth = 101
model.backbone.dc5 = False
train.output_dir = "./output/conditional_detr_r101_108ep"
