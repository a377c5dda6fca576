"""DINO-4scale, ResNet-101 (the R50 model with a deeper backbone)."""
from .dino_r50_4scale import model

model.backbone.depth = 101
