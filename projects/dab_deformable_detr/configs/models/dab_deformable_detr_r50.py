"""DAB-Deformable-DETR R50: Deformable DETR (4 levels, 8 heads, 4 points, 6+6 layers) with
300 learned anchor-box queries, refined layer by layer.

Official DAB-DETR repository hyperparameters for ``-m dab_deformable_detr``: FFN 2048,
dropout 0, ReLU, 300 queries, iterative box refinement; sigmoid focal loss (alpha 0.25, gamma
2) with weights class 1 / L1 5 / GIoU 2 and matcher costs 2 / 5 / 2. The backbone, neck,
encoder and positional encoding (offset -0.5, temperature 10000) are Deformable DETR's, so
this file starts from Deformable DETR's model config and changes only what differs.
"""
from d2detr.modeling.deformable_transformer import AnchorDeformableDecoder
from d2detr.projects.dab_deformable_detr.modeling import DABDeformableDETR

from .....configs.common.models.deformable_r50 import model

model._target_ = DABDeformableDETR
model.transformer.decoder._target_ = AnchorDeformableDecoder
model.transformer.decoder.embed_dim = 256
for layer in (model.transformer.encoder.encoder_layer, model.transformer.decoder.decoder_layer):
    layer.ffn_dim = 2048
    layer.dropout = 0.0
model.criterion.weight_dict = {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
model.with_box_refine = True
model.random_refpoints_xy = False
