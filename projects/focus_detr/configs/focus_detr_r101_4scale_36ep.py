"""Focus-DETR R101 4-scale, 36 epochs (release: 51.4 AP).

The release's ``focus_detr_r101_4scale_36ep.py`` builds an R50 (see ``focus_detr_r50_4scale_36ep.py``);
the published R101 checkpoint is ``focus_detr_r101_4scale_36ep_v2``, and ``_v2`` is the output of the
36-epoch recipe of ``focus_detr_r50_4scale_36ep.py`` (one lr decay, x0.1 at epoch 20 of 36, no
warm-up). So: that recipe with ResNet-101, temperature 20, no offset.
"""
from .focus_detr_r50_4scale_12ep import release_scheduler
from .focus_detr_r50_4scale_24ep import ITERS_PER_EPOCH, dataloader, model, optimizer, train  # noqa: F401

model.backbone.depth = 101
lr_multiplier = release_scheduler(36, 20)
train.max_iter = 36 * ITERS_PER_EPOCH
train.output_dir = "./output/focus_detr_r101_4scale_36ep"
