"""DAB-Deformable-DETR (Liu et al., ICLR 2022) as a d2detr project: ``d2detr.projects.dab_deformable_detr``."""
from .dab_deformable_detr import DABDeformableDETR

__all__ = ["DABDeformableDETR"]
