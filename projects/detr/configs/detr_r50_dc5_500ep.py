"""DETR DC5-R50, 500 epochs (paper: 43.3 AP, 41M parameters).

res5 dilated (stride 16): the encoder sees 4x more tokens. Recipe of detr_r50_500ep
(the paper trained DC5 models with the same hyperparameters).
"""
from .detr_r50_500ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.dc5 = True
train.output_dir = "./output/detr_r50_dc5_500ep"
