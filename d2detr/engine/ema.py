"""Exponential moving average (EMA) of model weights.

``ema = d * ema + (1 - d) * weight`` after every optimizer step, for every
floating-point parameter and buffer, with ``d = decay`` or, given ``ramp_steps`` > 0, the ramped
``d = decay * (1 - exp(-num_updates / ramp_steps))`` of YOLOv5 / RT-DETR (the EMA follows the
weights closely at first, so that a short run's early EMA is not mostly the initial weights); integer buffers (e.g. BatchNorm's
``num_batches_tracked``) are copied. :class:`~d2detr.engine.DetrTrainer` calls
:meth:`ModelEMA.update` right after the optimizer step, before any hook runs, so a
checkpoint written by a hook always holds the EMA of the weights it saves. The EMA is
a checkpointable (``state_dict`` / ``load_state_dict``):
``DetectionCheckpointer(model, model_ema=ema)`` saves and resumes it, and
:meth:`ModelEMA.apply_to` swaps it into the model for evaluation.
"""
import contextlib
import math
from typing import Dict

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["ModelEMA", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper."""
    while isinstance(model, (DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


class ModelEMA:
    """EMA of a model's state (parameters and buffers).

    Args:
        model: the model to track (a DDP wrapper is unwrapped); the EMA starts as a copy.
        decay: the EMA decay per optimizer step.
        ramp_steps: the time constant, in steps, of the decay's ramp from 0 to ``decay``
            (0: no ramp).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998, ramp_steps: float = 0.0):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        if not ramp_steps >= 0.0:
            raise ValueError(f"EMA ramp_steps must be >= 0, got {ramp_steps}")
        self.decay = float(decay)
        self.ramp_steps = float(ramp_steps)
        self.num_updates = 0
        self.state: Dict[str, torch.Tensor] = {
            k: v.detach().clone() for k, v in unwrap_model(model).state_dict().items()
        }

    def current_decay(self) -> float:
        """The decay the next :meth:`update` uses."""
        if self.ramp_steps == 0.0:
            return self.decay
        return self.decay * (1.0 - math.exp(-(self.num_updates + 1) / self.ramp_steps))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s current weights."""
        decay = self.current_decay()
        self.num_updates += 1
        ema_floats, model_floats = [], []
        for k, v in unwrap_model(model).state_dict().items():
            ema = self.state[k]
            if ema.is_floating_point():
                ema_floats.append(ema)
                model_floats.append(v.detach())
            else:
                ema.copy_(v)
        if ema_floats:
            torch._foreach_lerp_(ema_floats, model_floats, 1.0 - decay)

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        """Restart the EMA from ``model``'s weights (e.g. after loading a pretrained checkpoint)."""
        for k, v in unwrap_model(model).state_dict().items():
            self.state[k].copy_(v)
        self.num_updates = 0

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the EMA weights into ``model``."""
        for k, v in unwrap_model(model).state_dict().items():
            v.copy_(self.state[k])

    @contextlib.contextmanager
    def apply_to(self, model: nn.Module):
        """Evaluate with the EMA weights: loads them into ``model`` and restores the
        model's own weights on exit."""
        backup = {k: v.detach().clone() for k, v in unwrap_model(model).state_dict().items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, v in unwrap_model(model).state_dict().items():
                    v.copy_(backup[k])

    def state_dict(self):
        return {"num_updates": self.num_updates, "state": self.state}

    @torch.no_grad()
    def load_state_dict(self, state_dict):
        state = state_dict["state"]
        missing = sorted(set(self.state) - set(state))
        if missing:
            raise KeyError(f"The EMA state to load lacks {len(missing)} entries, e.g. {missing[:3]}")
        for k, v in self.state.items():
            v.copy_(state[k])
        self.num_updates = int(state_dict.get("num_updates", 0))
