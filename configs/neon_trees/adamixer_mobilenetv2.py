"""AdaMixer on NEON trees for the convergence comparison (``tools/compare_convergence.py``).

The paper's model (``projects/adamixer/configs/models/adamixer_r50.py``: 6 stages, 3D sampling
of 4 groups x 32 points, adaptive mixing to 128 points, IoF-biased self-attention, focal 2 / L1 5
/ GIoU 2, matcher 2 / 5 / 2) at the comparison's size (``adamixer_family.py``: MobileNetV2 C2-C5,
width 128, FFN 512, 100 queries, one class), trained with the comparison's optimizer (see
``adamixer_family.py``): AdamW lr 2e-4, backbone x0.1, weight decay 1e-4, clipping 0.1; data, lr
schedule and seed from ``common.py``.
"""
from ...projects.adamixer.configs.models.adamixer_r50 import model
from .adamixer_family import comparison_optimizer, to_neon_trees
from .common import dataloader, lr_multiplier, optimizer, train  # noqa: F401

to_neon_trees(model)
comparison_optimizer(optimizer)
train.output_dir = "./output/convergence/adamixer"
