"""Single-scale Deformable DETR: res5 only (stride 32), one feature level."""
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from .deformable_detr_r50 import model

model.backbone.out_features = ["res5"]
model.neck.input_shapes = {"res5": L(ShapeSpec)(channels=2048, stride=32)}
model.neck.in_features = ["res5"]
model.neck.num_outs = 1
model.transformer.num_feature_levels = 1
model.transformer.encoder.encoder_layer.num_levels = 1
model.transformer.decoder.decoder_layer.num_levels = 1
