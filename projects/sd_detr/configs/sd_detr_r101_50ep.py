"""SD-DETR R101, 50 epochs on COCO. Recipe of sd_detr_r50_50ep."""
from .sd_detr_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.depth = 101
train.output_dir = "./output/sd_detr_r101_50ep"
