"""DAB-Deformable-DETR on NEON trees for the convergence comparison (``tools/compare_convergence.py``).

The paper's model (``projects/dab_deformable_detr/configs/models/dab_deformable_detr_r50.py``:
Deformable DETR's encoder, neck and position encoding with learned 4-D anchor-box queries,
box refinement in every layer, dropout 0, focal loss 1/5/2, matcher 2/5/2) at the
comparison's shared size (``common.py``): ImageNet MobileNetV2 res3/res4/res5
(strides 8/16/32), width 128, 2+2 layers, FFN 512, one class.
Deviations: 100 queries instead of 300 and 3 feature levels instead of 4 (as for
Deformable DETR here); the lr x0.1 groups are Deformable DETR's (backbone, sampling offsets,
reference points) while the official DAB-Deformable-DETR optimizer slows only the backbone
(projects/dab_deformable_detr's own configs do that) — kept so the committed curves reproduce.
"""
from ...projects.dab_deformable_detr.configs.models.dab_deformable_detr_r50 import model
from ..common.optim import DEFORMABLE_LR_FACTORS
from .common import dataloader, lr_multiplier, optimizer, size_multi_scale_model, train  # noqa: F401

size_multi_scale_model(model)

optimizer.lr = 2e-4
optimizer.params.lr_factor_func.factors = dict(DEFORMABLE_LR_FACTORS)
train.output_dir = "./output/convergence/dab_deformable_detr"
