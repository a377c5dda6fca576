"""DAB-DETR (Liu et al., ICLR 2022) as a d2detr project: ``d2detr.projects.dab_detr``."""
from .dab_detr import DABDETR
from .transformer import DabDetrDecoder, DabDetrEncoder, DabDetrTransformer

__all__ = ["DABDETR", "DabDetrDecoder", "DabDetrEncoder", "DabDetrTransformer"]
