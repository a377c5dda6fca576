"""DETR R50, 500 epochs on COCO (the paper's model: 42.0 AP, 41M parameters).

Official recipe: AdamW lr 1e-4 (backbone 1e-5), weight decay 1e-4, gradient
clipping at norm 0.1, total batch 64 (16 GPUs x 4 images), 500 epochs with the
learning rate dropped x0.1 after epoch 400. DETR's augmentation (flip,
multi-scale 480..800 with max 1333, random crop) from configs/common/data.

Initialise the backbone from ImageNet: a torchvision ResNet-50 checkpoint
converted with ``tools/convert_checkpoint.py resnet50-*.pth r50.pth``, then
``train.init_checkpoint=r50.pth``.
"""
from ....configs.common.coco_schedule import default_coco_epoch_scheduler, epochs_to_iters
from ....configs.common.data.coco_detr import dataloader
from ....configs.common.optim import AdamW as optimizer
from ....configs.common.train import train
from .models.detr_r50 import model

BATCH_SIZE = 64  # 16 GPUs x 4 images
EPOCHS, LR_DROP = 500, 400

dataloader.train.total_batch_size = BATCH_SIZE

optimizer.lr = 1e-4
optimizer.weight_decay = 1e-4
optimizer.params.lr_factor_func.factors = {"backbone": 0.1}  # backbone lr 1e-5

lr_multiplier = default_coco_epoch_scheduler(EPOCHS, LR_DROP, batch_size=BATCH_SIZE)

train.max_iter = epochs_to_iters(EPOCHS, batch_size=BATCH_SIZE)
train.clip_grad.enabled = True
train.clip_grad.params.max_norm = 0.1
train.checkpointer.period = epochs_to_iters(10, batch_size=BATCH_SIZE)
train.eval_period = epochs_to_iters(10, batch_size=BATCH_SIZE)
train.output_dir = "./output/detr_r50_500ep"
