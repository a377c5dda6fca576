"""Detectron2's Faster R-CNN (``faster_rcnn_mobilenetv2_fpn.py``) trained with AdamW instead of SGD:
the fairness check of the baseline's optimizer (``tools/compare_detectron2_baselines.py --methods
faster_rcnn_adamw``). The RetinaNet baseline only learns with AdamW at this batch size and budget,
so the Faster R-CNN gets the same chance: AdamW, lr 1e-4, weight decay 1e-4, every parameter at
the full lr, no clipping -- the RetinaNet config's optimizer; everything else as the SGD config.
"""
from .detectron2_baseline_common import adamw_optimizer as optimizer  # noqa: F401
from .faster_rcnn_mobilenetv2_fpn import dataloader, lr_multiplier, model, train  # noqa: F401

train.output_dir = "./output/baselines/faster_rcnn_adamw"
