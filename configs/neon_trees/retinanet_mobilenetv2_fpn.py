"""Detectron2's RetinaNet (FPN) on NEON trees, a baseline of ``tools/compare_detectron2_baselines.py``.

Detectron2's own ``RetinaNet`` (its ``common/models/retinanet.py``: focal loss 0.25/2, 4x256 conv
heads, 9 anchors per position) on the ImageNet MobileNetV2 the DETR configs use, FPN P3-P7 from
res3-res5 (P6/P7 from res5, as the paper). Changed for the data (``detectron2_baseline_common.py``
has the rest of the recipe): one class; anchor octaves from 16 px on P3 (COCO: 32 px), i.e.
16-256 px x {2^0, 2^1/3, 2^2/3} on P3-P7 (crowns are 8-108 px); AdamW instead of the shared SGD
(below).
"""
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config
from detectron2.modeling.backbone import FPN
from detectron2.modeling.backbone.fpn import LastLevelP6P7

from d2detr.modeling.backbone import MobileNetV2Backbone

from .detectron2_baseline_common import FPN_CHANNELS, MOBILENET_CHANNELS, PIXEL_MEAN, PIXEL_STD  # noqa: F401
from .detectron2_baseline_common import adamw_optimizer as optimizer  # noqa: F401
from .detectron2_baseline_common import dataloader, lr_multiplier, train  # noqa: F401

model = get_config("common/models/retinanet.py").model
model.backbone = L(FPN)(
    bottom_up=L(MobileNetV2Backbone)(out_features=["res3", "res4", "res5"], pretrained=True),
    in_features=["res3", "res4", "res5"],
    out_channels=FPN_CHANNELS,
    top_block=L(LastLevelP6P7)(in_channels=MOBILENET_CHANNELS["res5"][0], out_channels=FPN_CHANNELS),
)
model.head.conv_dims = [FPN_CHANNELS] * 4
model.anchor_generator.sizes = [[x, x * 2 ** (1.0 / 3), x * 2 ** (2.0 / 3)] for x in [16, 32, 64, 128, 256]]
model.num_classes = 1
model.pixel_mean = PIXEL_MEAN
model.pixel_std = PIXEL_STD
model.input_format = "RGB"

# AdamW (lr 1e-4, weight decay 1e-4, every parameter at the full lr), not the Faster R-CNN's SGD:
# at batch 2 and ~10^3 steps SGD does not get this RetinaNet off the ground -- lr 0.01 diverged
# (NaN loss at iteration 81), 0.005 and 0.00125 left the focal loss flat at ~0.9 and AP at 0.2 / 0.4
# after 15 min; on one batch the focal loss per positive anchor went from 1.13 to 1.12 / 1.07 in 40
# SGD steps at 0.005 / 0.02 and to 0.55 with AdamW. With AdamW: 12.4 AP in the 15-min comparison
# (docs/detectron2_baselines.md, "The baselines' recipe").

train.output_dir = "./output/baselines/retinanet"
