"""RNNDet R50, 100 queries, 1x (12 epochs) on COCO, NF = 6 decoder layers (the initial stage + 5
weight-tied refinement steps, FFNDet's depth).

The training recipe is the DEQDet code base's FFNDet baseline (``MCG-NJU/DEQDet``,
``projects/configs/ffndet_r50_1x_coco.py``) = DEQDet's 1x recipe (``configs/common/adamixer_recipe.py``):
AdamW lr 2.5e-5, weight decay 0.01, the decoder at lr x4 and weight decay x10, clip 1, batch 16,
12 epochs with lr x0.1 after epochs 8 and 11, warm-up 500 iterations; mmdet's 1x data. The other
depths of the paper: ``rnndet_r50_nf{8,12,16,20}_12ep.py``.
"""
from ....configs.common.adamixer_recipe import (
    DEQDET_DECODER_LR_FACTORS,
    DEQDET_DECODER_WEIGHT_DECAY_FACTORS,
    apply_recipe,
)
from ....configs.common.data.coco_mmdet_1x import dataloader
from ....configs.common.optim import AdamW as optimizer
from ....configs.common.train import train
from .models.rnndet_r50 import model

model.refinement_steps = 5
lr_multiplier = apply_recipe(
    optimizer, train, dataloader, epochs=12, lr_drops=[8, 11], weight_decay=0.01,
    lr_factors=DEQDET_DECODER_LR_FACTORS, weight_decay_factors=DEQDET_DECODER_WEIGHT_DECAY_FACTORS,
)
train.output_dir = "./output/rnndet_r50_nf6_12ep"
