"""RNNDet (Wang et al., ICCV 2023, the RNN view of DEQDet's paper): an initial AdaMixer stage and
one weight-tied refinement stage unrolled K times, trained by back-propagation through all steps.

Importable as ``d2detr.projects.rnndet``."""
from .modeling import RNNDet

__all__ = ["RNNDet"]
