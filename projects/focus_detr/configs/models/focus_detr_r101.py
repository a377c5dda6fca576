"""Focus-DETR R101 (4 scales): the R50 model with a deeper backbone."""
from .focus_detr_r50 import model

model.backbone.depth = 101
