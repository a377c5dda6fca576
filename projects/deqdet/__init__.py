"""DEQDet (Wang et al., ICCV 2023): query refinement as the fixed point of one weight-tied
AdaMixer stage, trained with refinement-aware gradients (RAG) and perturbations (RAP).

Importable as ``d2detr.projects.deqdet``."""
from .modeling import DEQDet, in_loss_backward_step

__all__ = ["DEQDet", "in_loss_backward_step"]
