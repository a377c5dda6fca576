"""AdaMixer R50, 100 queries, 1x (12 epochs) on COCO (the paper: 42.7 AP).

Official recipe (``MCG-NJU/AdaMixer``, ``configs/adamixer/adamixer_r50_1x_coco.py``;
``configs/common/adamixer_recipe.py``): AdamW lr 2.5e-5 for every parameter (the backbone
included), weight decay 1e-4, gradient clipping at norm 1.0, total batch 16, 12 epochs with lr x0.1
after epochs 8 and 11, a linear warm-up over 500 iterations from x0.001; mmdet's 1x data
(``configs/common/data/coco_mmdet_1x.py``: resize to 1333x800, flip, images without objects dropped).

Initialise the backbone from ImageNet: ``tools/convert_checkpoint.py resnet50-*.pth r50.pth``, then
``train.init_checkpoint=r50.pth``.
"""
from ....configs.common.adamixer_recipe import apply_recipe
from ....configs.common.data.coco_mmdet_1x import dataloader
from ....configs.common.optim import AdamW as optimizer
from ....configs.common.train import train
from .models.adamixer_r50 import model

lr_multiplier = apply_recipe(optimizer, train, dataloader, epochs=12, lr_drops=[8, 11], weight_decay=1e-4)
train.output_dir = "./output/adamixer_r50_12ep"
