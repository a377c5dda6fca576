"""Conditional DETR DC5-R50, 108 epochs (paper: 45.1 AP). Recipe of conditional_detr_r50_108ep."""
from .conditional_detr_r50_108ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.depth = 50
model.backbone.dc5 = True
train.output_dir = "./output/conditional_detr_r50_dc5_108ep"
