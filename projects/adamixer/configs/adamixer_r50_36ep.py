"""AdaMixer R50, 300 queries, 3x (36 epochs) with multi-scale + crop training on COCO (the paper:
47.0 AP).

Official recipe (``configs/adamixer/adamixer_r50_300_query_crop_mstrain_480-800_3x_coco.py``): the
1x recipe (``adamixer_r50_12ep.py``: AdamW 2.5e-5, weight decay 1e-4, clip 1.0, batch 16, warm-up
500 iterations) for 36 epochs with lr x0.1 after epochs 24 and 33, 300 queries and 300 detections
per image, and DETR's augmentation (flip; short edge 480..800 max 1333, or resize 400/500/600 ->
random crop 384..600 -> short edge 480..800; ``configs/common/data/coco_detr.py``), images without
objects dropped as in mmdet.
"""
from ....configs.common.coco_schedule import default_coco_epoch_scheduler, epochs_to_iters
from ....configs.common.data.coco_detr import dataloader
from ....configs.common.data.coco_mmdet_1x import MMDET_COCO_TRAIN_IMAGES
from .adamixer_r50_12ep import BATCH_SIZE, WARMUP_ITERS, model, optimizer, train

EPOCHS, LR_DROPS = 36, [24, 33]
SCHEDULE = dict(batch_size=BATCH_SIZE, num_images=MMDET_COCO_TRAIN_IMAGES)

model.num_queries = 300
dataloader.train.dataset.filter_empty = True
dataloader.train.total_batch_size = BATCH_SIZE

lr_multiplier = default_coco_epoch_scheduler(EPOCHS, LR_DROPS, warmup_iters=WARMUP_ITERS, warmup_factor=0.001, **SCHEDULE)
train.max_iter = epochs_to_iters(EPOCHS, **SCHEDULE)
train.output_dir = "./output/adamixer_r50_36ep"
