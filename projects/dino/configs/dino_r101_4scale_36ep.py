"""DINO-4scale R101, 36 epochs: the R50 recipe (dino_r50_4scale_36ep.py) with ResNet-101 (no published AP).
"""
from ....configs.common.coco_schedule import default_coco_epoch_scheduler, epochs_to_iters
from .dino_r50_4scale_12ep import BATCH_SIZE, dataloader, optimizer, train  # noqa: F401
from .models.dino_r101_4scale import model  # noqa: F401

EPOCHS, LR_DROP = 36, 30
lr_multiplier = default_coco_epoch_scheduler(EPOCHS, LR_DROP, batch_size=BATCH_SIZE)
train.max_iter = epochs_to_iters(EPOCHS, batch_size=BATCH_SIZE)
train.output_dir = "./output/dino_r101_4scale_36ep"
