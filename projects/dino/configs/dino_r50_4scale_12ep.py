"""DINO-4scale R50, 12 epochs on COCO (paper / official release: 49.0 AP, checkpoint0011_4scale.pth).

Official recipe (IDEA-Research/DINO, ``config/DINO/DINO_4scale.py`` + ``scripts/DINO_train*.sh``):
AdamW lr 1e-4, weight decay 1e-4, the backbone at lr 1e-5 (``param_dict_type="default"``: no lower
rate for the sampling offsets, unlike Deformable DETR), gradient clipping at norm 0.1, total batch
16 (8 GPUs x 2 images), 12 epochs with lr x0.1 after epoch 11 (``lr_drop=11``), no EMA
(``use_ema=False``); DETR's augmentation (flip, multi-scale 480..800 max 1333, random crop).

Initialise the backbone from ImageNet: ``tools/convert_checkpoint.py resnet50-*.pth r50.pth``,
then ``train.init_checkpoint=r50.pth``; or load the official release converted with
``tools/convert_checkpoint.py checkpoint0011_4scale.pth dino_r50_4scale.pth``.
"""
from ....configs.common.coco_schedule import default_coco_epoch_scheduler, epochs_to_iters
from ....configs.common.data.coco_detr import dataloader
from ....configs.common.optim import AdamW as optimizer
from ....configs.common.train import train
from .models.dino_r50_4scale import model

BATCH_SIZE = 16  # 8 GPUs x 2 images
EPOCHS, LR_DROP = 12, 11

dataloader.train.total_batch_size = BATCH_SIZE

optimizer.lr = 1e-4
optimizer.weight_decay = 1e-4
optimizer.params.lr_factor_func.factors = {"backbone": 0.1}  # backbone lr 1e-5

lr_multiplier = default_coco_epoch_scheduler(EPOCHS, LR_DROP, batch_size=BATCH_SIZE)

train.max_iter = epochs_to_iters(EPOCHS, batch_size=BATCH_SIZE)
train.clip_grad.enabled = True
train.clip_grad.params.max_norm = 0.1
train.checkpointer.period = epochs_to_iters(1, batch_size=BATCH_SIZE)
train.eval_period = epochs_to_iters(1, batch_size=BATCH_SIZE)
train.output_dir = "./output/dino_r50_4scale_12ep"
