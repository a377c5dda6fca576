"""Two-stage DAB-Deformable-DETR R50, 50 epochs: recipe of dab_deformable_detr_r50_50ep, anchors
from the encoder's top-300 proposals."""
from .dab_deformable_detr_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.transformer.two_stage = True
train.output_dir = "./output/dab_deformable_detr_two_stage_r50_50ep"
