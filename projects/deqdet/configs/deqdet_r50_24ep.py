"""DEQDet R50, 300 queries, 2x (24 epochs) with multi-scale + crop training on COCO (the paper:
49.5 AP; the released checkpoint 49.6).

Official recipe (``projects/configs/eqdet_r50_2x_coco.py``): the 1x recipe (``deqdet_r50_12ep.py``:
AdamW 2.5e-5, weight decay 0.01, decoder lr x4 / weight decay x10, clip 1, batch 16, warm-up 500
iterations) for 24 epochs with lr x0.1 after epochs 16 and 22, 300 queries and 300 detections per
image, DETR's augmentation (``configs/common/data/coco_detr.py``, images without objects dropped).
"""
from ....configs.common.coco_schedule import default_coco_epoch_scheduler, epochs_to_iters
from ....configs.common.data.coco_detr import dataloader
from ....configs.common.data.coco_mmdet_1x import MMDET_COCO_TRAIN_IMAGES
from .deqdet_r50_12ep import BATCH_SIZE, WARMUP_ITERS, model, optimizer, train

EPOCHS, LR_DROPS = 24, [16, 22]
SCHEDULE = dict(batch_size=BATCH_SIZE, num_images=MMDET_COCO_TRAIN_IMAGES)

model.num_queries = 300
dataloader.train.dataset.filter_empty = True
dataloader.train.total_batch_size = BATCH_SIZE

lr_multiplier = default_coco_epoch_scheduler(EPOCHS, LR_DROPS, warmup_iters=WARMUP_ITERS, warmup_factor=0.001, **SCHEDULE)
train.max_iter = epochs_to_iters(EPOCHS, **SCHEDULE)
train.output_dir = "./output/deqdet_r50_24ep"
