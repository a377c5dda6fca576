"""Faults injected into a real model during ``do_train`` (for the trainer tests): a config wraps
its model as ``model = L(with_faults)(model=<the real model config>, kill_at_iter=4)``; the
returned object is the real detector itself, with hooks that act at a given training iteration
(read from Detectron2's event storage, so it is the trainer's iteration also after a resume)."""
import math
import os
import signal

from detectron2.utils import comm
from detectron2.utils.events import get_event_storage


def _iteration():
    try:
        return get_event_storage().iter
    except AssertionError:  # not inside a trainer
        return None


def with_faults(model, kill_at_iter: int = -1, nonfinite_at_iter: int = -1, nonfinite_rank: int = -1):
    """``kill_at_iter``: SIGKILL the process when the training forward of that iteration starts.
    ``nonfinite_at_iter``: the backbone's features become inf there (on ``nonfinite_rank`` only,
    or on every worker when it is < 0), so the predictions overflow to NaN/inf."""

    def pre_forward(module, args):
        if module.training and _iteration() == kill_at_iter:
            os.kill(os.getpid(), signal.SIGKILL)

    def backbone_output(module, args, output):
        if not model.training or _iteration() != nonfinite_at_iter:
            return output
        if nonfinite_rank >= 0 and comm.get_rank() != nonfinite_rank:
            return output
        return {k: v * math.inf for k, v in output.items()}

    model.register_forward_pre_hook(pre_forward)
    model.backbone.register_forward_hook(backbone_output)
    return model
