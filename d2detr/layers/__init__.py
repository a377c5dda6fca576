# --- core (box ops, position encodings, MLP) ---
from .box_ops import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    inverse_sigmoid,
)
from .mlp import MLP
from .position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine
