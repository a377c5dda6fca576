"""DETR R101, 500 epochs (paper: 43.5 AP, 60M parameters). Recipe of detr_r50_500ep."""
from .detr_r50_500ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.depth = 101
train.output_dir = "./output/detr_r101_500ep"
