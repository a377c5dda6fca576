"""DAB-DETR R101: the R50 model with a ResNet-101 backbone."""
from .dab_detr_r50 import model

model.backbone.depth = 101
