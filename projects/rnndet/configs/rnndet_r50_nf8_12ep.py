"""RNNDet R50, 1x, NF = 8 decoder layers: the initial stage + 7 weight-tied refinement steps,
all trained by back-propagation through the unroll (otherwise rnndet_r50_nf6_12ep.py)."""
from .rnndet_r50_nf6_12ep import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

model.refinement_steps = 7
train.output_dir = "./output/rnndet_r50_nf8_12ep"
