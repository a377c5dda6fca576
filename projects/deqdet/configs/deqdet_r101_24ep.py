"""DEQDet R101, 300 queries, 2x on COCO (the released checkpoint: 50.5 AP); official
``eqdet_r101_2x_coco.py``: the R50 2x recipe (``deqdet_r50_24ep.py``) with a ResNet-101."""
from .deqdet_r50_24ep import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

model.backbone.depth = 101
train.output_dir = "./output/deqdet_r101_24ep"
