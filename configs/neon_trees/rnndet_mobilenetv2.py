"""RNNDet on NEON trees for the convergence comparison (``tools/compare_convergence.py``) and the
AP-vs-refinement-steps plot (``tools/plot_refinement_steps.py``).

DEQDet's decoder (``projects/rnndet/configs/models/rnndet_r50.py``: an initial stage + one
weight-tied stage, 64 points, 3x3 conv + ReLU neck) unrolled 5 times (NF = 6, AdaMixer's depth)
and trained through every step, at the comparison's size (``adamixer_family.py``). Its recipe is
DEQDet's (``projects/rnndet/configs/rnndet_r50_nf6_12ep.py``): AdamW lr 2.5e-5, weight decay 0.01,
the two stages at lr x4 and weight decay x10, gradient clipping at norm 1.0; data, lr schedule
and seed from ``common.py``. Test-time steps: ``model.test_refinement_steps=N`` (default 5).
"""
from ...projects.rnndet.configs.rnndet_r50_nf6_12ep import optimizer
from ...projects.rnndet.configs.models.rnndet_r50 import model
from .adamixer_family import to_neon_trees
from .common import dataloader, lr_multiplier, train  # noqa: F401

to_neon_trees(model)
model.refinement_steps = 5

train.clip_grad.params.max_norm = 1.0
train.output_dir = "./output/convergence/rnndet"
