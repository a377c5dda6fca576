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

# --- multi-scale deformable attention (native op + reference + module) ---
from .ms_deform_attn import (
    MultiScaleDeformableAttention,
    get_library_path,
    ms_deform_attn,
    ms_deform_attn_reference,
    native_ms_deform_attn_available,
)
