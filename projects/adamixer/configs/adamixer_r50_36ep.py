"""AdaMixer R50, 300 queries, 3x (36 epochs) with multi-scale + crop training on COCO (the paper:
47.0 AP).

Official recipe (``configs/adamixer/adamixer_r50_300_query_crop_mstrain_480-800_3x_coco.py``): the
1x recipe (``configs/common/adamixer_recipe.py``: AdamW 2.5e-5, weight decay 1e-4, clip 1.0, batch
16, warm-up 500 iterations) for 36 epochs with lr x0.1 after epochs 24 and 33, 300 queries and 300
detections per image, and DETR's augmentation (flip; short edge 480..800 max 1333, or resize
400/500/600 -> random crop 384..600 -> short edge 480..800; ``configs/common/data/coco_detr.py``),
images without objects dropped as in mmdet.
"""
from ....configs.common.adamixer_recipe import apply_recipe
from ....configs.common.data.coco_detr import dataloader
from ....configs.common.optim import AdamW as optimizer
from ....configs.common.train import train
from .models.adamixer_r50 import model

model.num_queries = 300
lr_multiplier = apply_recipe(optimizer, train, dataloader, epochs=36, lr_drops=[24, 33], weight_decay=1e-4)
train.output_dir = "./output/adamixer_r50_36ep"
