"""Conditional DETR (Meng et al., ICCV 2021) as a d2detr project: ``d2detr.projects.conditional_detr``."""
from .conditional_detr import ConditionalDETR

__all__ = ["ConditionalDETR"]
