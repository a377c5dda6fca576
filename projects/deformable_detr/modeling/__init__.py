"""Deformable DETR's model is the multi-scale core every deformable method builds on, so it lives in
``d2detr.modeling``; this project holds its configs and README. The names stay importable from here."""
from d2detr.modeling.deformable_transformer import DeformableDetrTransformer
from d2detr.modeling.meta_arch.deformable_detr import DeformableDETR

__all__ = ["DeformableDETR", "DeformableDetrTransformer"]
