"""DEQDet R50, 100 queries, 1x (12 epochs) on COCO (the paper: 46.0 AP).

Official recipe (``MCG-NJU/DEQDet``, ``projects/configs/eqdet_r50_1x_coco.py`` on mmdet 3's
``schedule_1x``; ``configs/common/adamixer_recipe.py``): AdamW lr 2.5e-5, weight decay 0.01, the
decoder (``bbox_head``: here ``init_stage`` and ``refine_stage``) at lr x4 and weight decay x10,
gradient clipping at norm 1, total batch 16, 12 epochs with lr x0.1 after epochs 8 and 11, a linear
warm-up over 500 iterations from x0.001; mmdet's 1x data (``configs/common/data/coco_mmdet_1x.py``).

``model.checkpoint_refinement=True`` trades one extra forward of each supervised refinement step
for memory (see the project README).
"""
from ....configs.common.adamixer_recipe import (
    DEQDET_DECODER_LR_FACTORS,
    DEQDET_DECODER_WEIGHT_DECAY_FACTORS,
    apply_recipe,
)
from ....configs.common.data.coco_mmdet_1x import dataloader
from ....configs.common.optim import AdamW as optimizer
from ....configs.common.train import train
from .models.deqdet_r50 import model

lr_multiplier = apply_recipe(
    optimizer, train, dataloader, epochs=12, lr_drops=[8, 11], weight_decay=0.01,
    lr_factors=DEQDET_DECODER_LR_FACTORS, weight_decay_factors=DEQDET_DECODER_WEIGHT_DECAY_FACTORS,
)
train.output_dir = "./output/deqdet_r50_12ep"
