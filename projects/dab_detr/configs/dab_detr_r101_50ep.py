"""DAB-DETR R101, 50 epochs (paper: 43.5 AP, 63M parameters). Recipe of dab_detr_r50_50ep."""
from .dab_detr_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.depth = 101
model.backbone.dc5 = False
model.transformer.num_patterns = 0
train.output_dir = "./output/dab_detr_r101_50ep"
