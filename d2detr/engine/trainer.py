"""One trainer for every device and precision.

Detectron2's ``AMPTrainer`` asserts CUDA; :class:`DetrTrainer` runs the same loop
as ``SimpleTrainer`` and adds what DETR-style training needs:

* mixed precision: ``torch.autocast`` on CUDA (float16 with a ``GradScaler``, or
  bfloat16 without one) and bfloat16 autocast on CPU;
* gradient clipping by the norm of all gradients together (DETR's ``--clip_max_norm``);
* a non-finite loss check before ``backward``/optimizer step: it raises
  ``FloatingPointError`` naming the iteration on every worker, so the weights (and
  thus any later checkpoint) are never touched by the bad step;
* a ``FloatingPointError`` raised while computing the losses (the matcher's check of the
  predictions, reduced over workers so that all raise together) is re-raised naming the iteration;
* an optional :class:`~d2detr.engine.ModelEMA`, updated right after each optimizer step;
* with ``seed``, torch's global RNG (all devices) is re-seeded from ``(seed, iteration, rank)``
  before every step, so dropout and denoising noise of a step do not depend on the steps before
  it and a resumed run draws what an uninterrupted one draws. (numpy's and Python's RNGs are
  left alone: the model does not use them, and a Detectron2 loader with ``num_workers=0`` draws
  its augmentations from numpy's in the main process.)
"""
import time
from typing import Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from detectron2.engine import SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from .ema import ModelEMA

__all__ = ["DetrTrainer", "resolve_amp_dtype"]

_DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_amp_dtype(dtype: Union[None, str, torch.dtype], device_type: str) -> torch.dtype:
    """The autocast dtype: ``None`` means float16 on CUDA and bfloat16 on CPU."""
    if dtype is None:
        return torch.float16 if device_type == "cuda" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().replace("torch.", "")
    if key not in _DTYPES:
        raise ValueError(f"Unknown amp dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[key]


class DetrTrainer(SimpleTrainer):
    """``SimpleTrainer`` with AMP (CUDA and CPU), gradient clipping, a non-finite loss
    guard and an optional weight EMA.

    Args:
        model, data_loader, optimizer, gather_metric_period, zero_grad_before_forward,
            async_write_metrics: as in :class:`detectron2.engine.SimpleTrainer`.
        amp: run forward and loss under ``torch.autocast``.
        amp_dtype: ``"float16"``/``"bfloat16"`` (or a ``torch.dtype``); ``None``
            picks float16 on CUDA and bfloat16 on CPU. float16 on CUDA uses a
            ``GradScaler``; bfloat16 needs none.
        clip_grad_max_norm: clip the norm of all gradients to this value; ``None``/0 disables.
        clip_grad_norm_type: the norm's type (2.0 = Euclidean).
        model_ema: a :class:`ModelEMA` to update after every optimizer step.
        seed: re-seed torch's RNG before every step from ``(seed, iteration, rank)``
            (checkpointed in :meth:`state_dict`); None keeps one stream for the whole run.
    """

    def __init__(
        self,
        model,
        data_loader,
        optimizer,
        *,
        amp: bool = False,
        amp_dtype: Union[None, str, torch.dtype] = None,
        clip_grad_max_norm: Optional[float] = None,
        clip_grad_norm_type: float = 2.0,
        model_ema: Optional[ModelEMA] = None,
        seed: Optional[int] = None,
        gather_metric_period: int = 1,
        zero_grad_before_forward: bool = False,
        async_write_metrics: bool = False,
    ):
        super().__init__(
            model,
            data_loader,
            optimizer,
            gather_metric_period=gather_metric_period,
            zero_grad_before_forward=zero_grad_before_forward,
            async_write_metrics=async_write_metrics,
        )
        param = next(model.parameters())
        self.device_type = param.device.type
        self.amp = bool(amp)
        self.amp_dtype = resolve_amp_dtype(amp_dtype, self.device_type)
        if self.amp and self.device_type not in ("cuda", "cpu"):
            raise ValueError(f"AMP is supported on cuda and cpu, not {self.device_type}")
        self.grad_scaler = None
        if self.amp and self.device_type == "cuda" and self.amp_dtype == torch.float16:
            self.grad_scaler = torch.amp.GradScaler("cuda")
        self.clip_grad_max_norm = float(clip_grad_max_norm) if clip_grad_max_norm else None
        self.clip_grad_norm_type = float(clip_grad_norm_type)
        self.model_ema = model_ema
        self.seed = None if seed is None else int(seed)

    def seed_step(self) -> None:
        """Seeds torch's RNG (all devices) from ``(seed, iteration, rank)``."""
        if self.seed is None:
            return
        state = np.random.SeedSequence([self.seed, int(self.iter), comm.get_rank()]).generate_state(1)
        torch.manual_seed(int(state[0]))

    def run_step(self):
        assert self.model.training, "[DetrTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        # after next(): the loader's first next() draws from torch's RNG (the iterator's base seed)
        self.seed_step()

        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        try:
            with torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=self.amp):
                loss_dict = self.model(data)
                if isinstance(loss_dict, torch.Tensor):
                    losses = loss_dict
                    loss_dict = {"total_loss": loss_dict}
                else:
                    losses = sum(loss_dict.values())
        except FloatingPointError as e:  # e.g. the matcher's check of the predictions
            raise FloatingPointError(
                f"{e} at iteration={self.iter}; training stopped before the optimizer step, so weights "
                "and checkpoints are untouched."
            ) from e
        self._raise_if_nonfinite(losses, loss_dict)

        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        if self.grad_scaler is not None:
            self.grad_scaler.scale(losses).backward()
        else:
            losses.backward()
        self.after_backward()

        grad_norm = None
        if self.clip_grad_max_norm is not None:
            if self.grad_scaler is not None:
                self.grad_scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), self.clip_grad_max_norm, self.clip_grad_norm_type
            )

        if self.async_write_metrics:
            self.concurrent_executor.submit(
                self._write_metrics, loss_dict, data_time, iter=self.iter
            )
        else:
            self._write_metrics(loss_dict, data_time)

        if grad_norm is not None:
            grad_norm = float(grad_norm)
            # With a GradScaler an inf/nan gradient only makes it skip the step;
            # otherwise the step would write non-finite weights.
            if self.grad_scaler is None and not torch.isfinite(torch.tensor(grad_norm)):
                raise FloatingPointError(
                    f"Gradient norm became {grad_norm} at iteration={self.iter}; "
                    "training stopped before the optimizer step."
                )
            get_event_storage().put_scalar("grad_norm", grad_norm)

        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        if self.model_ema is not None:
            self.model_ema.update(self.model)

    def _raise_if_nonfinite(self, losses: torch.Tensor, loss_dict) -> None:
        bad = ~torch.isfinite(losses.detach()).all()
        if comm.get_world_size() > 1:
            # Every worker must stop at the same step, or the others hang in DDP's all-reduce.
            bad = bad.to(torch.float32).reshape(1)
            dist.all_reduce(bad)
        if bool(bad.item()):
            values = {k: float(v.detach().float().mean()) for k, v in loss_dict.items()}
            where = "" if comm.get_world_size() == 1 else " on at least one worker"
            raise FloatingPointError(
                f"Loss became infinite or NaN at iteration={self.iter}{where}; training stopped "
                f"before the optimizer step, so weights and checkpoints are untouched.\n"
                f"loss_dict (rank {comm.get_rank()}) = {values}"
            )

    def state_dict(self):
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        if self.seed is not None:
            ret["seed"] = self.seed
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
        if self.seed is not None and "seed" in state_dict:
            self.seed = int(state_dict["seed"])
