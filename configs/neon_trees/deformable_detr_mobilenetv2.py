"""Deformable DETR on NEON trees for the convergence comparison (``tools/compare_convergence.py``).

The paper's single-stage model without box refinement
(``projects/deformable_detr/configs/models/deformable_detr_r50.py``: multi-scale deformable
encoder and decoder, 8 heads, 4 points, GN channel mapper plus an extra stride-2 level,
focal loss 2/5/2, matcher 2/5/2, dropout 0.1), sized as the demo's
``deformable_detr_mobilenetv2`` model and the comparison's ``common.py``: ImageNet MobileNetV2
res3/res4/res5 (strides 8/16/32), width 128, 2+2 layers, FFN 512, 100 queries, one class.
Deviation: 3 feature levels instead of 4 (the demo's choice; tiles are 400 px and the
largest crown is 108 px, so a stride-64 level adds nothing but cost).
"""
from ...projects.deformable_detr.configs.models.deformable_detr_mobilenetv2 import model
from ..common.optim import DEFORMABLE_LR_FACTORS
from .common import (  # noqa: F401
    D_MODEL, DEC_LAYERS, ENC_LAYERS, FFN_DIM, NUM_CLASSES, NUM_HEADS, NUM_QUERIES,
    dataloader, lr_multiplier, optimizer, train,
)

model.embed_dim = D_MODEL
model.neck.out_channels = D_MODEL
model.position_embedding.num_pos_feats = D_MODEL // 2
model.transformer.embed_dim = D_MODEL
model.transformer.encoder.num_layers = ENC_LAYERS
model.transformer.decoder.num_layers = DEC_LAYERS
for layer in (model.transformer.encoder.encoder_layer, model.transformer.decoder.decoder_layer):
    layer.embed_dim = D_MODEL
    layer.num_heads = NUM_HEADS
    layer.ffn_dim = FFN_DIM
model.with_box_refine = False
model.num_classes = NUM_CLASSES
model.num_queries = NUM_QUERIES
model.select_box_nums_for_evaluation = NUM_QUERIES

optimizer.lr = 2e-4
optimizer.params.lr_factor_func.factors = dict(DEFORMABLE_LR_FACTORS)
train.output_dir = "./output/convergence/deformable_detr"
