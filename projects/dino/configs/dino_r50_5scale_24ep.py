"""DINO-5scale R50, 24 epochs (paper: 51.3 AP); schedule as dino_r50_4scale_24ep.py.
"""
from ....configs.common.coco_schedule import default_coco_epoch_scheduler, epochs_to_iters
from .dino_r50_4scale_12ep import BATCH_SIZE, dataloader, optimizer, train  # noqa: F401
from .models.dino_r50_5scale import model  # noqa: F401

EPOCHS, LR_DROP = 24, 20
lr_multiplier = default_coco_epoch_scheduler(EPOCHS, LR_DROP, batch_size=BATCH_SIZE)
train.max_iter = epochs_to_iters(EPOCHS, batch_size=BATCH_SIZE)
train.output_dir = "./output/dino_r50_5scale_24ep"
