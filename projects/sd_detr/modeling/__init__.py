"""SD-DETR (Zhang et al., ICCV 2023) as a d2detr project: ``d2detr.projects.sd_detr``."""
from .criterion import SDDETRCriterion, task_aligned_focal_loss, task_alignment_targets
from .query_generation import DiscriminativePoints, MiniDetector, roi_align
from .sd_detr import SDDETR
from .transformer import DECOUPLING_MODES, SDDecoderLayer, SDDetrDecoder, SDDetrTransformer

__all__ = [
    "SDDETR",
    "SDDETRCriterion",
    "SDDetrTransformer",
    "SDDetrDecoder",
    "SDDecoderLayer",
    "DECOUPLING_MODES",
    "MiniDetector",
    "DiscriminativePoints",
    "roi_align",
    "task_alignment_targets",
    "task_aligned_focal_loss",
]
