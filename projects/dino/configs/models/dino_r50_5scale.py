"""DINO-5scale, ResNet-50 (official ``config/DINO/DINO_5scale.py``): the 4-scale model with res2
(stride 4) as a fifth, finest level (``return_interm_indices=[0, 1, 2, 3]``)."""
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from .dino_r50_4scale import model

model.backbone.out_features = ["res2", "res3", "res4", "res5"]
model.neck.input_shapes["res2"] = L(ShapeSpec)(channels=256, stride=4)
model.neck.in_features = ["res2", "res3", "res4", "res5"]
model.neck.num_outs = 5
model.transformer.num_feature_levels = 5
for layer in (model.transformer.encoder.encoder_layer, model.transformer.decoder.decoder_layer):
    layer.num_levels = 5
