"""DETR DC5-R101, 500 epochs (paper: 44.9 AP, 60M parameters). Recipe of detr_r50_500ep."""
from .detr_r50_500ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.depth = 101
model.backbone.dc5 = True
train.output_dir = "./output/detr_r101_dc5_500ep"
