"""DAB-DETR DC5-R50: res5 dilated (stride 16)."""
from .dab_detr_r50 import model

model.backbone.dc5 = True
