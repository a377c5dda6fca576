"""Focus-DETR R101 4-scale, 24 epochs (release: 51.2 AP): the R50 24-epoch recipe with ResNet-101."""
from .focus_detr_r50_4scale_24ep import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

model.backbone.depth = 101
train.output_dir = "./output/focus_detr_r101_4scale_24ep"
