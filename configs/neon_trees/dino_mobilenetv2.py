"""DINO on NEON trees for the convergence comparison (``tools/compare_convergence.py``).

The paper's model (``projects/dino/configs/models/dino_r50_4scale.py``: contrastive denoising with
box noise 1.0 and label noise 0.5, mixed query selection, look-forward-twice, shared heads,
dropout 0, temperature-20 position embedding, focal loss 1/5/2 on every layer, the denoising
queries and the selected proposals, matcher 2/5/2, backbone lr x0.1 only) at the comparison's
shared size (``common.py``): ImageNet MobileNetV2 res3/res4/res5 (strides 8/16/32), width 128,
2+2 layers, FFN 512, one class. Deviations, the same as for the other deformable methods here:
100 queries instead of 900 and 3 feature levels instead of 4; the denoising budget stays 100
(the densest tile has ~60 crowns, so usually one or two groups).
"""
from ...projects.dino.configs.models.dino_r50_4scale import model
from .common import D_MODEL, dataloader, lr_multiplier, optimizer, size_multi_scale_model, train  # noqa: F401

size_multi_scale_model(model)
model.transformer.decoder.norm.normalized_shape = D_MODEL
model.denoising.embed_dim = D_MODEL

optimizer.lr = 2e-4
optimizer.params.lr_factor_func.factors = {"backbone": 0.1}
train.output_dir = "./output/convergence/dino"
