from .detr_base import DETRBase

__all__ = ["DETRBase"]
