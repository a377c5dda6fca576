"""Conditional DETR DC5-R101, 50 epochs (paper: 45.0 AP, 63M parameters). Recipe of conditional_detr_r50_50ep."""
from .conditional_detr_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.depth = 101
model.backbone.dc5 = True
train.output_dir = "./output/conditional_detr_r101_dc5_50ep"
