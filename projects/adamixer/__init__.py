"""AdaMixer (Gao et al., CVPR 2022): a fast-converging query-based detector without an encoder.

Importable as ``d2detr.projects.adamixer``."""
from .modeling import AdaMixer

__all__ = ["AdaMixer"]
