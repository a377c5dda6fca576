"""Conditional DETR R101, 50 epochs (paper: 42.8 AP, 63M parameters). Recipe of conditional_detr_r50_50ep."""
from .conditional_detr_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.depth = 101
model.backbone.dc5 = False
train.output_dir = "./output/conditional_detr_r101_50ep"
