from .rnndet import RNNDet

__all__ = ["RNNDet"]
