"""Focus-DETR R50 (4 scales): the PyTorch release's architecture (huawei-noah/noah-research
``Focus-DETR/projects/focus_detr/configs/models/focus_detr_r50.py``, on detrex's DINO), built from
the shared multi-scale R50 model.

- backbone ResNet-50, FrozenBN, only the stem frozen (detectron2 ``freeze_at=1``: res2 trains);
  res3-res5 + one 3x3/s2 level on res5, 1x1 projections, GroupNorm 32;
- sine position embedding, temperature 10000 and offset -0.5 (the 12-epoch configs; the 24/36-epoch
  ones switch to temperature 20, no offset);
- foreground token selector (shared score predictor, top-down modulation with 3 alphas ~U(-0.3, 0.3)),
  keep ratio 0.5, cascade 1.0/0.8/0.6/0.6/0.4/0.2 over the 6 encoder layers, dual attention over the
  top 300 tokens, deformable attention into the neck features;
- 6 + 6 layers, width 256, 8 heads, 4 points, FFN 2048, dropout 0, ReLU;
- DINO's queries and decoder: 900 queries (top-900 proposals by largest class logit as anchors,
  learned content), anchor decoder without query scale, decoder LayerNorm, look-forward-twice,
  ``inverse_sigmoid`` eps 1e-3; per-layer decoder heads, the proposal heads the 7th entries;
- contrastive denoising: 100 queries' budget, label noise 0.5, box noise 1.0, label embedding of
  ``num_classes`` rows (no "unknown" row);
- focal loss (alpha 0.25, gamma 2), class 1 / L1 5 / GIoU 2 on every decoder layer, the denoising
  queries and the selected proposals (real classes); matcher 2 / 5 / 2; foreground loss 1.5 with
  strides 8/16/32/64 and ranges (-1, 64], (64, 128], (128, 256], (256, inf); top-300 detections.
"""
from detectron2.config import LazyCall as L
from torch import nn

from d2detr.modeling.deformable_transformer import AnchorDeformableDecoder
from d2detr.modeling.denoising import ContrastiveDenoising
from d2detr.projects.focus_detr.modeling import (
    FocusCriterion,
    FocusDETR,
    FocusDetrTransformer,
    FocusEncoder,
    FocusEncoderLayer,
)
from d2detr.projects.focus_detr.modeling.criterion import OFFICIAL_FOREGROUND_RANGES, OFFICIAL_FOREGROUND_STRIDES
from d2detr.projects.focus_detr.modeling.transformer import OFFICIAL_CASCADE_RATIOS

from .....configs.common.models.deformable_r50 import model

model._target_ = FocusDETR
model.backbone.freeze_at = 1
model.transformer._target_ = FocusDetrTransformer
model.transformer.two_stage = True
model.transformer.alpha_init_range = 0.3
model.transformer.encoder._target_ = FocusEncoder
model.transformer.encoder.keep_ratio = 0.5
model.transformer.encoder.cascade_ratios = list(OFFICIAL_CASCADE_RATIOS)
model.transformer.encoder.encoder_layer._target_ = FocusEncoderLayer
model.transformer.encoder.encoder_layer.num_dual_tokens = 300
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
    unknown_label=False,
)
model.criterion._target_ = FocusCriterion
model.criterion.weight_dict = {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_foreground": 1.5}
model.criterion.enc_class_agnostic = False
model.criterion.foreground_strides = list(OFFICIAL_FOREGROUND_STRIDES)
model.criterion.foreground_ranges = [list(r) for r in OFFICIAL_FOREGROUND_RANGES]
model.num_queries = 900
model.with_box_refine = True
model.share_decoder_heads = False
model.inverse_sigmoid_eps = 1e-3
model.select_box_nums_for_evaluation = 300
