"""DAB-DETR R50 with 3 pattern embeddings (Anchor DETR's multiple patterns): each of the 300
anchors is decoded with 3 learned content queries, 900 predictions in all."""
from .dab_detr_r50 import model

model.transformer.num_patterns = 3
