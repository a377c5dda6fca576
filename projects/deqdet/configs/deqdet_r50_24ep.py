"""DEQDet R50, 300 queries, 2x (24 epochs) with multi-scale + crop training on COCO (the paper:
49.5 AP; the released checkpoint 49.6).

Official recipe (``projects/configs/eqdet_r50_2x_coco.py``): the 1x recipe (``deqdet_r50_12ep.py``:
AdamW 2.5e-5, weight decay 0.01, decoder lr x4 / weight decay x10, clip 1, batch 16, warm-up 500
iterations) for 24 epochs with lr x0.1 after epochs 16 and 22, 300 queries and 300 detections per
image, DETR's augmentation (``configs/common/data/coco_detr.py``, images without objects dropped).
"""
from ....configs.common.adamixer_recipe import (
    DEQDET_DECODER_LR_FACTORS,
    DEQDET_DECODER_WEIGHT_DECAY_FACTORS,
    apply_recipe,
)
from ....configs.common.data.coco_detr import dataloader
from ....configs.common.optim import AdamW as optimizer
from ....configs.common.train import train
from .models.deqdet_r50 import model

model.num_queries = 300
lr_multiplier = apply_recipe(
    optimizer, train, dataloader, epochs=24, lr_drops=[16, 22], weight_decay=0.01,
    lr_factors=DEQDET_DECODER_LR_FACTORS, weight_decay_factors=DEQDET_DECODER_WEIGHT_DECAY_FACTORS,
)
train.output_dir = "./output/deqdet_r50_24ep"
