"""DAB-DETR DC5-R50 with 3 patterns, 50 epochs (paper: 45.7 AP, 44M parameters). Recipe of dab_detr_r50_50ep."""
from .dab_detr_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.depth = 50
model.backbone.dc5 = True
model.transformer.num_patterns = 3
train.output_dir = "./output/dab_detr_r50_dc5_3patterns_50ep"
