from .deformable_detr import DeformableDETR
from .transformer import DeformableDetrTransformer

__all__ = ["DeformableDETR", "DeformableDetrTransformer"]
