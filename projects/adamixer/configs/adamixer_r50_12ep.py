"""AdaMixer R50, 100 queries, 1x (12 epochs) on COCO (the paper: 42.7 AP).

Official recipe (``MCG-NJU/AdaMixer``, ``configs/adamixer/adamixer_r50_1x_coco.py``): AdamW lr
2.5e-5 for every parameter (the backbone included), weight decay 1e-4, gradient clipping at norm
1.0, total batch 16, 12 epochs with lr x0.1 after epochs 8 and 11, a linear warm-up over 500
iterations from x0.001; mmdet's 1x data (``configs/common/data/coco_mmdet_1x.py``: resize to
1333x800, flip, images without objects dropped).

Initialise the backbone from ImageNet: ``tools/convert_checkpoint.py resnet50-*.pth r50.pth``, then
``train.init_checkpoint=r50.pth``.
"""
from ....configs.common.coco_schedule import default_coco_epoch_scheduler, epochs_to_iters
from ....configs.common.data.coco_mmdet_1x import MMDET_COCO_TRAIN_IMAGES, dataloader
from ....configs.common.optim import AdamW as optimizer
from ....configs.common.train import train
from .models.adamixer_r50 import model

BATCH_SIZE = 16
EPOCHS, LR_DROPS, WARMUP_ITERS = 12, [8, 11], 500
SCHEDULE = dict(batch_size=BATCH_SIZE, num_images=MMDET_COCO_TRAIN_IMAGES)

dataloader.train.total_batch_size = BATCH_SIZE

optimizer.lr = 2.5e-5
optimizer.weight_decay = 1e-4
optimizer.params.lr_factor_func.factors = {}  # no lr multipliers, not even for the backbone

lr_multiplier = default_coco_epoch_scheduler(EPOCHS, LR_DROPS, warmup_iters=WARMUP_ITERS, warmup_factor=0.001, **SCHEDULE)

train.max_iter = epochs_to_iters(EPOCHS, **SCHEDULE)
train.clip_grad.enabled = True
train.clip_grad.params.max_norm = 1.0
train.checkpointer.period = epochs_to_iters(1, **SCHEDULE)
train.eval_period = epochs_to_iters(1, **SCHEDULE)
train.output_dir = "./output/adamixer_r50_12ep"
