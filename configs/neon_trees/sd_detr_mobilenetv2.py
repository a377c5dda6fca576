"""SD-DETR on NEON trees for the convergence comparison (``tools/compare_convergence.py``).

The paper's model (``projects/sd_detr/configs/models/sd_detr_r50.py``: Conditional DETR with a
mini-detector, decoupled cross-attention, task-aware queries, task-alignment loss; dropout 0.1,
matcher 2/5/2, loss weights 2/5/2) at the comparison's shared size (``common.py``): ImageNet
MobileNetV2 res5 (stride 32), d_model 128, 2+2 layers, FFN 512, one class, and
Conditional DETR's optimiser settings (lr 2e-4, backbone x0.1).
Deviation: 100 queries instead of 300 (the same for every method).

The ablation rows are this config with overrides (``METHOD_OVERRIDES`` in
``tools/compare_convergence.py``): ``sd_detr_baseline``, ``sd_detr_dfl``, ``sd_detr_taq``, ``sd_detr``.
"""
from detectron2.config import LazyCall as L

from d2detr.modeling.backbone import MobileNetV2Backbone

from ...projects.sd_detr.configs.models.sd_detr_r50 import model
from .common import (  # noqa: F401
    D_MODEL, DEC_LAYERS, ENC_LAYERS, FFN_DIM, NUM_CLASSES, NUM_HEADS, NUM_QUERIES,
    dataloader, lr_multiplier, optimizer, train,
)

model.backbone = L(MobileNetV2Backbone)(out_features=["res5"], pretrained=True)
model.in_feature = "res5"
model.position_embedding.num_pos_feats = D_MODEL // 2
model.transformer.d_model = D_MODEL
model.transformer.nhead = NUM_HEADS
model.transformer.num_encoder_layers = ENC_LAYERS
model.transformer.num_decoder_layers = DEC_LAYERS
model.transformer.dim_feedforward = FFN_DIM
model.num_classes = NUM_CLASSES
model.num_queries = NUM_QUERIES
model.select_box_nums_for_evaluation = NUM_QUERIES

optimizer.lr = 2e-4
optimizer.params.lr_factor_func.factors = {"backbone": 0.1}
train.output_dir = "./output/convergence/sd_detr"
