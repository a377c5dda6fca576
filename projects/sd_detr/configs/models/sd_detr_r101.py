"""SD-DETR R101: the R50 model (``sd_detr_r50.py``) on ResNet-101."""
from .sd_detr_r50 import model

model.backbone.depth = 101
