"""RNNDet on NEON trees for the convergence comparison (``tools/compare_convergence.py``) and the
AP-vs-refinement-steps plot (``tools/plot_refinement_steps.py``).

DEQDet's decoder (``projects/rnndet/configs/models/rnndet_r50.py``: an initial stage + one
weight-tied stage, 64 points, 3x3 conv + ReLU neck) unrolled 5 times (NF = 6, AdaMixer's depth)
and trained through every step, at the comparison's size with the comparison's optimizer
(``adamixer_family.py``); data, lr schedule and seed from ``common.py``. Test-time steps:
``model.test_refinement_steps=N`` (default 5).
"""
from ...projects.rnndet.configs.models.rnndet_r50 import model
from .adamixer_family import comparison_optimizer, to_neon_trees
from .common import dataloader, lr_multiplier, optimizer, train  # noqa: F401

to_neon_trees(model)
model.refinement_steps = 5
comparison_optimizer(optimizer)
train.output_dir = "./output/convergence/rnndet"
