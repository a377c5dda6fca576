from .criterion import FocusCriterion
from .focus_detr import FocusDETR
from .foreground import ForegroundScorePredictor, ForegroundTokenSelector, foreground_labels, foreground_loss
from .transformer import FocusDetrTransformer, FocusEncoder, FocusEncoderLayer

__all__ = [
    "FocusDETR",
    "FocusDetrTransformer",
    "FocusEncoder",
    "FocusEncoderLayer",
    "FocusCriterion",
    "ForegroundScorePredictor",
    "ForegroundTokenSelector",
    "foreground_labels",
    "foreground_loss",
]
