"""Two-stage Deformable DETR R50 (with box refinement), 50 epochs on COCO (the paper: 46.9 AP).

The recipe of deformable_detr_r50_50ep.py; only the model differs."""
from .deformable_detr_r50_50ep import dataloader, lr_multiplier, optimizer, train
from .models.deformable_detr_two_stage_r50 import model

train.output_dir = "./output/deformable_detr_two_stage_r50_50ep"
