from .detr import DETR

__all__ = ["DETR"]
