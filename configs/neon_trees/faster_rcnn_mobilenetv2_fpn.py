"""Detectron2's Faster R-CNN (FPN) on NEON trees, the baseline of ``tools/compare_detectron2_baselines.py``.

Detectron2's own model (``GeneralizedRCNN`` + ``RPN`` + ``StandardROIHeads``, as in its
``common/models/mask_rcnn_fpn.py`` without the mask head) on the ImageNet MobileNetV2 the DETR
configs use, FPN P2-P6 from res2-res5 (strides 4-32, P6 by max-pooling). Changed for the data
(``detectron2_baseline_common.py`` has the rest of the recipe): one class; anchors 16/32/64/128/256
on P2-P6 (COCO: 32-512; crowns are 8-108 px); 1000/500 proposals per image for training/test
after NMS (COCO: 1000/1000; a tile holds at most ~60 crowns); ROI batch 256 per image.
"""
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.model_zoo import get_config
from detectron2.modeling.backbone import FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from d2detr.modeling.backbone import MobileNetV2Backbone

from .detectron2_baseline_common import FPN_CHANNELS, PIXEL_MEAN, PIXEL_STD, dataloader, lr_multiplier, optimizer, train  # noqa: F401

model = get_config("common/models/mask_rcnn_fpn.py").model
model.backbone = L(FPN)(
    bottom_up=L(MobileNetV2Backbone)(out_features=["res2", "res3", "res4", "res5"], pretrained=True),
    in_features=["res2", "res3", "res4", "res5"],
    out_channels=FPN_CHANNELS,
    top_block=L(LastLevelMaxPool)(),
)
model.proposal_generator.head.in_channels = FPN_CHANNELS
model.proposal_generator.anchor_generator.sizes = [[16], [32], [64], [128], [256]]
model.proposal_generator.post_nms_topk = (1000, 500)
model.roi_heads.update(mask_in_features=None, mask_pooler=None, mask_head=None)
model.roi_heads.num_classes = 1
model.roi_heads.batch_size_per_image = 256
model.roi_heads.box_head.input_shape = ShapeSpec(channels=FPN_CHANNELS, height=7, width=7)
model.pixel_mean = PIXEL_MEAN
model.pixel_std = PIXEL_STD
model.input_format = "RGB"

train.output_dir = "./output/baselines/faster_rcnn"
