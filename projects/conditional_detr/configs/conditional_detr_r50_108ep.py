"""Conditional DETR R50, 108 epochs (paper: 43.0 AP): the 50-epoch recipe, lr drop after epoch 80."""
from ....configs.common.coco_schedule import default_coco_epoch_scheduler, epochs_to_iters
from .conditional_detr_r50_50ep import BATCH_SIZE, dataloader, model, optimizer, train

EPOCHS, LR_DROP = 108, 80
lr_multiplier = default_coco_epoch_scheduler(EPOCHS, LR_DROP, batch_size=BATCH_SIZE)
train.max_iter = epochs_to_iters(EPOCHS, batch_size=BATCH_SIZE)
train.output_dir = "./output/conditional_detr_r50_108ep"
