"""Focus-DETR R50 4-scale, 12 epochs on COCO (paper / release: 48.8 AP).

The PyTorch release's recipe (huawei-noah/noah-research ``Focus-DETR/projects/focus_detr/configs/
focus_detr_resnet/focus_detr_r50_4scale_12ep.py`` on detrex's ``common`` configs): AdamW lr 1e-4,
betas (0.9, 0.999), weight decay 1e-4 except on normalisation layers (detrex's
``weight_decay_norm=0.0``), the backbone at lr 1e-5, gradient clipping at norm 0.1, total batch 16,
``max_iter`` 90000 with lr x0.1 at iteration 82500 (detrex counts 7500 iterations an epoch) and
no warm-up, no EMA; DETR's augmentation (flip, multi-scale 480..800 max 1333, random crop), training
images without objects dropped (detrex's ``filter_empty`` default).

Initialise the backbone from ImageNet: ``tools/convert_checkpoint.py resnet50-*.pth r50.pth``, then
``train.init_checkpoint=r50.pth``; or convert a released checkpoint with
``tools/convert_checkpoint.py focus_detr_r50_4scale_12ep.pth out.pth``.
"""
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from ....configs.common.data.coco_detr import dataloader
from ....configs.common.optim import AdamW as optimizer
from ....configs.common.train import train
from .models.focus_detr_r50 import model

#: detrex's epoch: 1,440,000 images (the "1x" schedule) / 12 epochs / batch 16.
ITERS_PER_EPOCH = 7500


def release_scheduler(epochs: int, decay_epochs: int):
    """detrex's ``default_coco_scheduler(epochs, decay_epochs, 0)``: x0.1 after ``decay_epochs``."""
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=[1.0, 0.1], milestones=[decay_epochs * ITERS_PER_EPOCH, epochs * ITERS_PER_EPOCH]),
        warmup_length=0.0,
        warmup_method="linear",
        warmup_factor=0.001,
    )


dataloader.train.total_batch_size = 16
dataloader.train.dataset.filter_empty = True

optimizer.lr = 1e-4
optimizer.weight_decay = 1e-4
optimizer.params.weight_decay_norm = 0.0
optimizer.params.lr_factor_func.factors = {"backbone": 0.1}

lr_multiplier = release_scheduler(12, 11)

train.max_iter = 12 * ITERS_PER_EPOCH
train.clip_grad.enabled = True
train.clip_grad.params.max_norm = 0.1
train.clip_grad.params.norm_type = 2.0
train.checkpointer.period = 5000
train.eval_period = 5000
train.output_dir = "./output/focus_detr_r50_4scale_12ep"
