"""Conditional DETR DC5-R101, 108 epochs (paper: 45.9 AP). Recipe of conditional_detr_r50_108ep."""
from .conditional_detr_r50_108ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.depth = 101
model.backbone.dc5 = True
train.output_dir = "./output/conditional_detr_r101_dc5_108ep"
