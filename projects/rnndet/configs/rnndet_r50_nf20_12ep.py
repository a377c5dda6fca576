"""RNNDet R50, 1x, NF = 20 decoder layers: the initial stage + 19 weight-tied refinement steps,
all trained by back-propagation through the unroll (otherwise rnndet_r50_nf6_12ep.py)."""
from .rnndet_r50_nf6_12ep import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

model.refinement_steps = 19
train.output_dir = "./output/rnndet_r50_nf20_12ep"
