"""Learning-rate schedules by COCO epochs.

DETR-family papers state schedules in epochs over COCO train2017 (118,287 images) at
a total batch size of 16, with step decays (×0.1) at given epochs. Detectron2 trains
by iterations; these helpers convert. A config pairs them with the iteration count::

    from ...configs.common.coco_schedule import default_coco_epoch_scheduler, epochs_to_iters
    lr_multiplier = default_coco_epoch_scheduler(50, 40)        # Deformable DETR
    train.max_iter = epochs_to_iters(50)

Detectron2's schedulers are scale invariant (evaluated at iter / max_iter), so a
`train.max_iter=...` override keeps the decays at the same fraction of training.
"""
import math
from typing import Sequence, Union

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

COCO_TRAIN_IMAGES = 118287  # coco_2017_train


def iters_per_epoch(batch_size: int = 16, num_images: int = COCO_TRAIN_IMAGES) -> int:
    """Iterations in one epoch (the last, partial batch included)."""
    return math.ceil(num_images / batch_size)


def epochs_to_iters(epochs: float, batch_size: int = 16, num_images: int = COCO_TRAIN_IMAGES) -> int:
    """Iterations in ``epochs`` epochs; whole epochs land exactly on epoch boundaries."""
    return int(round(epochs * iters_per_epoch(batch_size, num_images)))


def default_coco_epoch_scheduler(
    epochs: float,
    decay_epochs: Union[float, Sequence[float]],
    batch_size: int = 16,
    warmup_iters: int = 0,
    gamma: float = 0.1,
    warmup_factor: float = 0.001,
    num_images: int = COCO_TRAIN_IMAGES,
):
    """LR multiplier for ``epochs`` epochs: ×``gamma`` after each of ``decay_epochs``,
    optionally after a linear warmup of ``warmup_iters`` iterations (from ``warmup_factor``).

    Returns the LazyCall config of a ``MultiStepParamScheduler`` in iterations (wrapped
    in a ``WarmupParamScheduler`` when ``warmup_iters > 0``).
    """
    if isinstance(decay_epochs, (int, float)):
        decay_epochs = [decay_epochs]
    decay_epochs = sorted(decay_epochs)
    if decay_epochs and not 0 < decay_epochs[-1] < epochs:
        raise ValueError(f"decay epochs {decay_epochs} must lie inside (0, {epochs})")
    total = epochs_to_iters(epochs, batch_size, num_images)
    scheduler = L(MultiStepParamScheduler)(
        values=[gamma**i for i in range(len(decay_epochs) + 1)],
        milestones=[epochs_to_iters(e, batch_size, num_images) for e in decay_epochs],
        num_updates=total,
    )
    if warmup_iters <= 0:
        return scheduler
    return L(WarmupParamScheduler)(
        scheduler=scheduler,
        warmup_length=warmup_iters / total,
        warmup_method="linear",
        warmup_factor=warmup_factor,
    )


# The schedules of the papers (batch size 16).
lr_multiplier_12ep = default_coco_epoch_scheduler(12, 11)  # DINO, Focus-DETR 1x
lr_multiplier_24ep = default_coco_epoch_scheduler(24, 20)
lr_multiplier_36ep = default_coco_epoch_scheduler(36, 30)
lr_multiplier_50ep = default_coco_epoch_scheduler(50, 40)  # Deformable / Conditional / DAB-DETR
lr_multiplier_500ep = default_coco_epoch_scheduler(500, 400)  # DETR
