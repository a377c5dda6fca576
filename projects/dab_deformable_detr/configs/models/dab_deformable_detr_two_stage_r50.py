"""Two-stage DAB-Deformable-DETR: the anchors are the top-300 encoder proposals (class-agnostic
encoder loss, as two-stage Deformable DETR) instead of learned embeddings."""
from .dab_deformable_detr_r50 import model

model.transformer.two_stage = True
