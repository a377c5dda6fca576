"""DAB-DETR DC5-R50, 50 epochs (paper: 44.5 AP, 44M parameters). Recipe of dab_detr_r50_50ep."""
from .dab_detr_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.depth = 50
model.backbone.dc5 = True
model.transformer.num_patterns = 0
train.output_dir = "./output/dab_detr_r50_dc5_50ep"
