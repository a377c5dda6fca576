"""Building blocks shared by the methods."""
from .ms_deform_attn import (
    MultiScaleDeformableAttention,
    get_library_path,
    ms_deform_attn,
    ms_deform_attn_reference,
    native_ms_deform_attn_available,
)

__all__ = [
    "MultiScaleDeformableAttention",
    "get_library_path",
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "native_ms_deform_attn_available",
]
