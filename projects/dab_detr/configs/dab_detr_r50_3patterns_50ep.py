"""DAB-DETR R50 with 3 patterns, 50 epochs (paper: 42.6 AP, 44M parameters). Recipe of dab_detr_r50_50ep."""
from .dab_detr_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.depth = 50
model.backbone.dc5 = False
model.transformer.num_patterns = 3
train.output_dir = "./output/dab_detr_r50_3patterns_50ep"
