"""DINO-4scale R50, 24 epochs (paper: 50.4 AP).

The official repository publishes the 24- and 36-epoch results but not their schedules; the lr drop
follows mmdetection's DINO 24e (after epoch 20) and detrex's 36-epoch schedule (after epoch 30).
Everything else is the 12-epoch recipe (dino_r50_4scale_12ep.py).
"""
from ....configs.common.coco_schedule import default_coco_epoch_scheduler, epochs_to_iters
from .dino_r50_4scale_12ep import BATCH_SIZE, dataloader, optimizer, train  # noqa: F401
from .models.dino_r50_4scale import model  # noqa: F401

EPOCHS, LR_DROP = 24, 20
lr_multiplier = default_coco_epoch_scheduler(EPOCHS, LR_DROP, batch_size=BATCH_SIZE)
train.max_iter = epochs_to_iters(EPOCHS, batch_size=BATCH_SIZE)
train.output_dir = "./output/dino_r50_4scale_24ep"
