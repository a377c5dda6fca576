"""What the AdaMixer, RNNDet and DEQDet configs of the NEON-trees comparison share.

:func:`to_neon_trees` turns a method's R50 model config into the comparison's size
(``common.py``): the ImageNet MobileNetV2 backbone, width 128, 8 heads, FFN 512, 100 queries,
one class. Deviation from the other methods' 3 levels (strides 8/16/32): these methods sample
the 4 levels C2-C5 of their papers, so MobileNetV2's stride-4 ``res2`` (24 channels, inside the
frozen part of the backbone) is a fourth input level of the neck. Everything else about the
decoders (AdaMixer's 6 stages, DEQDet's initial + tied stage, the sampling points: 4 groups,
32 or 64 in, 128 out) is the method's own: there is no encoder whose depth could be matched to
the others' 2+2 layers.

:func:`comparison_optimizer`: the comparison's optimizer of every method (AdamW lr 2e-4, backbone
x0.1, weight decay 1e-4, clipping at 0.1 from ``common.py``) instead of the papers' own
(AdaMixer: 2.5e-5 everywhere, weight decay 1e-4, clip 1.0; DEQDet and RNNDet: 2.5e-5, decoder x4,
weight decay 0.01 with x10 on the decoder), which are set for batch 16 on COCO. The DEQDet paper
compares FFNDet (= AdaMixer), RNNDet and DEQDet under one recipe too; here the three get the
recipe the other five methods of the comparison share, so the curves differ by architecture and
training scheme only.
"""
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from d2detr.modeling.backbone import MobileNetV2Backbone

from .common import D_MODEL, FFN_DIM, MOBILENET_CHANNELS, NUM_CLASSES, NUM_HEADS, NUM_QUERIES

#: MobileNetV2 features (channels, stride) of the four levels.
MOBILENET_C2_C5 = {"res2": (24, 4), **MOBILENET_CHANNELS}


def to_neon_trees(model):
    """Sets the comparison's backbone and sizes on an AdaMixer-family model config; returns it."""
    levels = list(MOBILENET_C2_C5)
    model.backbone = L(MobileNetV2Backbone)(out_features=levels, pretrained=True)
    model.neck.input_shapes = {k: L(ShapeSpec)(channels=c, stride=s) for k, (c, s) in MOBILENET_C2_C5.items()}
    model.neck.in_features = levels
    model.neck.out_channels = D_MODEL
    model.queries.content_dim = D_MODEL
    model.stage.content_dim = D_MODEL
    model.stage.feat_channels = D_MODEL
    model.stage.num_heads = NUM_HEADS
    model.stage.ffn_dim = FFN_DIM
    model.num_classes = NUM_CLASSES
    model.num_queries = NUM_QUERIES
    return model


def comparison_optimizer(optimizer):
    """The comparison's shared optimizer settings (lr 2e-4, backbone x0.1) on ``optimizer``."""
    optimizer.lr = 2e-4
    optimizer.params.lr_factor_func.factors = {"backbone": 0.1}
    return optimizer
