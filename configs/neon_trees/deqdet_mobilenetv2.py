"""DEQDet on NEON trees for the convergence comparison (``tools/compare_convergence.py``) and the
AP-vs-refinement-steps plot (``tools/plot_refinement_steps.py``).

The paper's model and training (``projects/deqdet/configs/models/deqdet_r50.py``: initial stage +
weight-tied stage, 64 points, 3x3 conv + ReLU neck; 2 supervised extra steps, 20 no-grad
fixed-point steps with RAP, RAG + loss after steps 1, 3, 6, 9, 12, 20; 21 steps at test) at the
comparison's size with the comparison's optimizer (``adamixer_family.py``); data, lr schedule and
seed from ``common.py``.
"""
from ...projects.deqdet.configs.models.deqdet_r50 import model
from .adamixer_family import comparison_optimizer, to_neon_trees
from .common import dataloader, lr_multiplier, optimizer, train  # noqa: F401

to_neon_trees(model)
comparison_optimizer(optimizer)
train.output_dir = "./output/convergence/deqdet"
