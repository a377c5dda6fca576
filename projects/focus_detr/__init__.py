"""Focus-DETR (Zheng et al., ICCV 2023) as a d2detr project: ``d2detr.projects.focus_detr``."""
from .modeling import FocusCriterion, FocusDETR, FocusDetrTransformer, FocusEncoder, FocusEncoderLayer

__all__ = ["FocusDETR", "FocusDetrTransformer", "FocusEncoder", "FocusEncoderLayer", "FocusCriterion"]
