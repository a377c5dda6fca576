"""DINO-5scale, ResNet-101 (the R50 5-scale model with a deeper backbone)."""
from .dino_r50_5scale import model

model.backbone.depth = 101
