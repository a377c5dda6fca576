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
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from d2detr.modeling.backbone import MobileNetV2Backbone

from ...projects.dab_deformable_detr.configs.models.dab_deformable_detr_r50 import model
from ..common.optim import DEFORMABLE_LR_FACTORS
from .common import (  # noqa: F401
    D_MODEL, DEC_LAYERS, ENC_LAYERS, FFN_DIM, MOBILENET_CHANNELS, NUM_CLASSES, NUM_HEADS, NUM_QUERIES,
    dataloader, lr_multiplier, optimizer, train,
)

model.backbone = L(MobileNetV2Backbone)(out_features=["res3", "res4", "res5"], pretrained=True)
model.neck.input_shapes = {
    name: L(ShapeSpec)(channels=channels, stride=stride) for name, (channels, stride) in MOBILENET_CHANNELS.items()
}
model.neck.out_channels = D_MODEL
model.neck.num_outs = 3
model.embed_dim = D_MODEL
model.position_embedding.num_pos_feats = D_MODEL // 2
model.transformer.embed_dim = D_MODEL
model.transformer.num_feature_levels = 3
model.transformer.decoder.embed_dim = D_MODEL
model.transformer.encoder.num_layers = ENC_LAYERS
model.transformer.decoder.num_layers = DEC_LAYERS
for layer in (model.transformer.encoder.encoder_layer, model.transformer.decoder.decoder_layer):
    layer.embed_dim = D_MODEL
    layer.num_heads = NUM_HEADS
    layer.num_levels = 3
    layer.ffn_dim = FFN_DIM
model.num_classes = NUM_CLASSES
model.num_queries = NUM_QUERIES
model.select_box_nums_for_evaluation = NUM_QUERIES

optimizer.lr = 2e-4
optimizer.params.lr_factor_func.factors = dict(DEFORMABLE_LR_FACTORS)
train.output_dir = "./output/convergence/dab_deformable_detr"
