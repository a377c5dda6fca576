"""AdaMixer on NEON trees for the convergence comparison (``tools/compare_convergence.py``).

The paper's model (``projects/adamixer/configs/models/adamixer_r50.py``: 6 stages, 3D sampling
of 4 groups x 32 points, adaptive mixing to 128 points, IoF-biased self-attention, focal 2 / L1 5
/ GIoU 2, matcher 2 / 5 / 2) at the comparison's size (``adamixer_family.py``: MobileNetV2 C2-C5,
width 128, FFN 512, 100 queries, one class). Its own optimisation: AdamW lr 2.5e-5 for every
parameter (no backbone factor), weight decay 1e-4, gradient clipping at norm 1.0; the data, lr
schedule and seed are ``common.py``'s.
"""
from ...projects.adamixer.configs.models.adamixer_r50 import model
from .adamixer_family import to_neon_trees
from .common import dataloader, lr_multiplier, optimizer, train  # noqa: F401

to_neon_trees(model)

optimizer.lr = 2.5e-5
optimizer.weight_decay = 1e-4
optimizer.params.lr_factor_func.factors = {}
train.clip_grad.params.max_norm = 1.0
train.output_dir = "./output/convergence/adamixer"
