"""Focus-DETR R101 4-scale, 12 epochs (release: 50.8 AP): the R50 12-epoch recipe with ResNet-101."""
from .focus_detr_r50_4scale_12ep import dataloader, lr_multiplier, optimizer, train  # noqa: F401
from .models.focus_detr_r101 import model  # noqa: F401

train.output_dir = "./output/focus_detr_r101_4scale_12ep"
