"""DINO-4scale, ResNet-50: the official architecture (IDEA-Research/DINO, ``config/DINO/DINO_4scale.py``
with the options of its training scripts), built from the shared multi-scale R50 model.

- backbone ResNet-50 (stem + res2 frozen, FrozenBN), res3-res5 + one 3x3/s2 level, GN 32;
- sine position embedding with temperature 20 and no -0.5 offset (``PositionEmbeddingSineHW``,
  ``pe_temperatureH/W=20``);
- 6 + 6 layers, width 256, 8 heads, 4 points, FFN 2048, dropout 0, ReLU;
- 900 queries: top-900 encoder proposals (largest class logit) as anchors, learned content;
  decoder positions from the anchors (``ref_point_head``, no query scale), decoder LayerNorm,
  look-forward-twice, ``inverse_sigmoid`` eps 1e-3;
- class and box heads shared by the decoder layers, separate proposal heads;
- contrastive denoising: 100 queries' budget, label noise 0.5 (flip probability 0.25), **box
  noise 1.0** (every official training script passes ``dn_box_noise_scale=1.0``; the config
  file's 0.4 is not what produced the published numbers);
- focal loss (alpha 0.25, gamma 2), weights class 1 / L1 5 / GIoU 2 on every decoder layer, the
  denoising queries and the selected encoder proposals (with their real classes); matcher
  costs 2 / 5 / 2; top-300 detections at inference (``num_select=300``).
"""
from detectron2.config import LazyCall as L
from torch import nn

from d2detr.modeling.deformable_transformer import AnchorDeformableDecoder
from d2detr.modeling.denoising import ContrastiveDenoising
from d2detr.modeling.dino_transformer import DinoTransformer
from d2detr.projects.dino.modeling import DINO

from .....configs.common.models.deformable_r50 import model

model._target_ = DINO
model.position_embedding.temperature = 20
model.position_embedding.offset = 0.0
model.transformer._target_ = DinoTransformer
model.transformer.two_stage = True
model.transformer.decoder._target_ = AnchorDeformableDecoder
model.transformer.decoder.embed_dim = 256
model.transformer.decoder.query_scale = False
model.transformer.decoder.look_forward_twice = True
model.transformer.decoder.norm = L(nn.LayerNorm)(normalized_shape=256)
for layer in (model.transformer.encoder.encoder_layer, model.transformer.decoder.decoder_layer):
    layer.ffn_dim = 2048
    layer.dropout = 0.0
model.denoising = L(ContrastiveDenoising)(
    num_classes="${..num_classes}",
    embed_dim=256,
    num_dn_queries=100,
    label_noise_ratio=0.5,
    box_noise_scale=1.0,
)
model.criterion.weight_dict = {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
model.criterion.enc_class_agnostic = False
model.num_queries = 900
model.with_box_refine = True
model.share_decoder_heads = True
model.inverse_sigmoid_eps = 1e-3
model.select_box_nums_for_evaluation = 300
