"""AdaMixer R101, 300 queries, 3x (36 epochs) with multi-scale + crop training on COCO (the paper:
48.0 AP); official ``adamixer_r101_300_query_crop_mstrain_480-800_3x_coco.py``: the R50 recipe
(``adamixer_r50_36ep.py``) with a ResNet-101 (``train.init_checkpoint`` from a converted
torchvision ``resnet101-*.pth``)."""
from .adamixer_r50_36ep import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

model.backbone.depth = 101
train.output_dir = "./output/adamixer_r101_36ep"
