"""AdaMixer R101, 100 queries, 1x (12 epochs) on COCO: the 1x recipe (``adamixer_r50_12ep.py``)
with a ResNet-101. Not an official config (the official R101 models are 3x); for a 1x R101
baseline."""
from .adamixer_r50_12ep import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

model.backbone.depth = 101
train.output_dir = "./output/adamixer_r101_12ep"
