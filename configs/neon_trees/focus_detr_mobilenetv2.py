"""Focus-DETR on NEON trees for the convergence comparison (``tools/compare_convergence.py``).

The paper's model (``projects/focus_detr/configs/models/focus_detr_r50.py``: DINO's denoising,
mixed query selection and look-forward-twice as in the PyTorch release -- per-layer heads,
temperature-10000 / offset -0.5 position embedding, no "unknown" label row --, the foreground token
selector with top-down modulation, keep ratio 0.5, dual attention over the top 300 kept tokens,
foreground loss 1.5, focal 1/5/2, matcher 2/5/2, backbone lr x0.1 only) at the comparison's shared
size (``common.py``): ImageNet MobileNetV2 res3/res4/res5, width 128, 2+2 layers, FFN 512, one class.

Decided here, because the comparison has 3 levels and 2 encoder layers instead of 4 and 6:

* foreground labels on the three MobileNet levels, strides 8/16/32 (the neck's real strides), with
  the release's ranges of the first two levels, (-1, 64] and (64, 128], and the last level taking
  every larger object, (128, inf) -- as the release's last level does from 256 on. A 400x400 tile's
  crowns (median ~30 px) land almost all on the stride-8 and stride-16 levels, as small COCO
  objects do with the release's ranges;
* cascade 1.0, 0.8 over the 2 encoder layers: the release's first two ratios;
* the rest as in the DINO entry: 100 queries, the denoising budget of 100.
"""
import math

from ...projects.focus_detr.configs.models.focus_detr_r50 import model
from .common import D_MODEL, dataloader, lr_multiplier, optimizer, size_multi_scale_model, train  # noqa: F401

size_multi_scale_model(model)
model.transformer.decoder.norm.normalized_shape = D_MODEL
model.denoising.embed_dim = D_MODEL
model.transformer.encoder.cascade_ratios = [1.0, 0.8]
model.criterion.foreground_strides = [8, 16, 32]
model.criterion.foreground_ranges = [[-1.0, 64.0], [64.0, 128.0], [128.0, math.inf]]

optimizer.lr = 2e-4
optimizer.params.lr_factor_func.factors = {"backbone": 0.1}
train.output_dir = "./output/convergence/focus_detr"
