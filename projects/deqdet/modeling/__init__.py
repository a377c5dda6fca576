from .deqdet import DEQDet
from .in_loss_backward import in_loss_backward_step

__all__ = ["DEQDet", "in_loss_backward_step"]
