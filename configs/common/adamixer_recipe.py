"""The COCO training recipe of the AdaMixer family's official mmdet configs (AdaMixer,
``MCG-NJU/AdaMixer``; DEQDet and the RNNDet/FFNDet baselines, ``MCG-NJU/DEQDet``).

AdamW lr 2.5e-5 for every parameter (no backbone multiplier), gradient clipping at norm 1.0,
total batch 16 (8 GPUs x 2), a linear warm-up over 500 iterations from x0.001, lr x0.1 after
each of ``lr_drops`` epochs, epochs of mmdet's 117,266 training images (``filter_empty_gt``),
COCO evaluation and a checkpoint after every epoch. Weight decay 1e-4 (AdaMixer) or 0.01 with
the decoder at lr x4 and weight decay x10 (DEQDet: ``paramwise_cfg.custom_keys = {"bbox_head":
dict(lr_mult=4, decay_mult=10)}``; mmdet's ``bbox_head`` are the stages here).
"""
from typing import Mapping, Optional, Sequence

from detectron2.config import LazyCall as L

from d2detr.engine.param_groups import LrFactorByName, get_optimizer_params_with_factors

from .coco_schedule import default_coco_epoch_scheduler, epochs_to_iters
from .data.coco_mmdet_1x import MMDET_COCO_TRAIN_IMAGES

BATCH_SIZE = 16
BASE_LR = 2.5e-5
WARMUP_ITERS = 500
#: DEQDet's decoder multipliers, by our module names
DEQDET_DECODER_LR_FACTORS = {"init_stage": 4.0, "refine_stage": 4.0}
DEQDET_DECODER_WEIGHT_DECAY_FACTORS = {"init_stage": 10.0, "refine_stage": 10.0}


def apply_recipe(
    optimizer,
    train,
    dataloader,
    epochs: int,
    lr_drops: Sequence[int],
    weight_decay: float,
    lr_factors: Optional[Mapping[str, float]] = None,
    weight_decay_factors: Optional[Mapping[str, float]] = None,
):
    """Sets the recipe on ``optimizer`` (``configs/common/optim.AdamW``), ``train`` and
    ``dataloader``; returns the ``lr_multiplier``."""
    schedule = dict(batch_size=BATCH_SIZE, num_images=MMDET_COCO_TRAIN_IMAGES)
    dataloader.train.total_batch_size = BATCH_SIZE
    dataloader.train.dataset.filter_empty = True
    optimizer.lr = BASE_LR
    optimizer.weight_decay = weight_decay
    optimizer.params = L(get_optimizer_params_with_factors)(
        base_lr="${..lr}",
        weight_decay="${..weight_decay}",
        lr_factor_func=L(LrFactorByName)(factors=dict(lr_factors or {})),
        weight_decay_factor_func=L(LrFactorByName)(factors=dict(weight_decay_factors or {})),
    )
    train.max_iter = epochs_to_iters(epochs, **schedule)
    train.clip_grad.enabled = True
    train.clip_grad.params.max_norm = 1.0
    train.checkpointer.period = epochs_to_iters(1, **schedule)
    train.eval_period = epochs_to_iters(1, **schedule)
    return default_coco_epoch_scheduler(epochs, list(lr_drops), warmup_iters=WARMUP_ITERS, warmup_factor=0.001, **schedule)
