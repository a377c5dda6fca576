"""Optimizers. DETR-family papers use AdamW, lr 1e-4, weight decay 1e-4 on all
parameters, betas (0.9, 0.999).

Per-parameter learning-rate factors go through Detectron2's
`get_default_optimizer_params(lr_factor_func=...)`; `LrFactorByName` keeps them
serialisable, e.g. in a method's config::

    optimizer.params.lr_factor_func = L(LrFactorByName)(factors=BACKBONE_LR_FACTORS)
"""
import torch
from detectron2.config import LazyCall as L
from detectron2.solver.build import get_default_optimizer_params

from d2detr.engine.param_groups import LrFactorByName

# DETR, Conditional/DAB-DETR, DINO: backbone at 0.1 x lr.
BACKBONE_LR_FACTORS = {"backbone": 0.1}
# Deformable DETR and descendants: also the sampling-offset and reference-point projections.
DEFORMABLE_LR_FACTORS = {"backbone": 0.1, "sampling_offsets": 0.1, "reference_points": 0.1}

AdamW = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(
        # params.model is set to the model object by train_net before instantiation.
        base_lr="${..lr}",
        lr_factor_func=L(LrFactorByName)(factors=BACKBONE_LR_FACTORS),
    ),
    lr=1e-4,
    betas=(0.9, 0.999),
    weight_decay=1e-4,
)
