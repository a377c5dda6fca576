"""Deformable DETR R50, 50 epochs on COCO (the paper: 44.5 AP, 40M parameters).

Official recipe (fundamentalvision/Deformable-DETR): AdamW lr 2e-4, weight decay 1e-4, the
backbone and the sampling-offset / reference-point projections at lr x0.1 (2e-5), gradient
clipping at norm 0.1, total batch 32, 50 epochs with lr x0.1 after epoch 40; DETR's
augmentation (flip, multi-scale 480..800 max 1333, random crop) from configs/common/data.

Initialise the backbone from ImageNet: a torchvision ResNet-50 checkpoint converted with
``tools/convert_checkpoint.py resnet50-*.pth r50.pth``, then ``train.init_checkpoint=r50.pth``.
"""
from ....configs.common.coco_schedule import default_coco_epoch_scheduler, epochs_to_iters
from ....configs.common.data.coco_detr import dataloader
from ....configs.common.optim import AdamW as optimizer
from ....configs.common.optim import DEFORMABLE_LR_FACTORS
from ....configs.common.train import train
from .models.deformable_detr_r50 import model

BATCH_SIZE = 32
EPOCHS, LR_DROP = 50, 40

dataloader.train.total_batch_size = BATCH_SIZE

optimizer.lr = 2e-4
optimizer.weight_decay = 1e-4
optimizer.params.lr_factor_func.factors = DEFORMABLE_LR_FACTORS

lr_multiplier = default_coco_epoch_scheduler(EPOCHS, LR_DROP, batch_size=BATCH_SIZE)

train.max_iter = epochs_to_iters(EPOCHS, batch_size=BATCH_SIZE)
train.clip_grad.enabled = True
train.clip_grad.params.max_norm = 0.1
train.checkpointer.period = epochs_to_iters(5, batch_size=BATCH_SIZE)
train.eval_period = epochs_to_iters(5, batch_size=BATCH_SIZE)
train.output_dir = "./output/deformable_detr_r50_50ep"
