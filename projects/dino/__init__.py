"""DINO (Zhang et al., ICLR 2023) as a d2detr project: ``d2detr.projects.dino``."""
from .modeling import DINO

__all__ = ["DINO"]
