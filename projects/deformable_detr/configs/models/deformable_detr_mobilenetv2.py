"""A small Deformable DETR for CPU: ImageNet MobileNetV2 (strides 8/16/32, offline weights),
3 feature levels, width 128, 2 encoder / 2 decoder layers, 100 queries.

Not a paper configuration: it exists so that a model can be trained in minutes on a CPU
(the demo); every piece is the same code as the R50 model."""
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from d2detr.modeling.backbone import MobileNetV2Backbone

from .deformable_detr_r50 import model

model.backbone = L(MobileNetV2Backbone)(out_features=["res3", "res4", "res5"], pretrained=True)
model.neck.input_shapes = {
    "res3": L(ShapeSpec)(channels=32, stride=8),
    "res4": L(ShapeSpec)(channels=96, stride=16),
    "res5": L(ShapeSpec)(channels=320, stride=32),
}
model.neck.out_channels = 128
model.neck.num_outs = 3
model.position_embedding.num_pos_feats = 64
model.embed_dim = 128
model.num_queries = 100
model.transformer.embed_dim = 128
model.transformer.num_feature_levels = 3
for part, layer in ((model.transformer.encoder, model.transformer.encoder.encoder_layer),
                    (model.transformer.decoder, model.transformer.decoder.decoder_layer)):
    part.num_layers = 2
    layer.embed_dim = 128
    layer.num_levels = 3
    layer.ffn_dim = 512
