"""Focus-DETR R50 4-scale, 36 epochs (paper / release: 50.4 AP).

The release's config files disagree with its checkpoints here. ``focus_detr_r50_4scale_36ep.py``
decays the lr once at epoch 20 (``lr_multiplier_24_36ep``) and writes ``..._36ep_v2``; but the
published R50 36-epoch checkpoint is ``focus_detr_r50_4scale_36ep_v3``, the output folder of the
file named ``focus_detr_r101_4scale_36ep.py`` -- which builds an R50 (it never sets depth 101) with
Detectron2's 3x schedule (``lr_multiplier_3x``): 1000 warm-up iterations from x0.001, x0.1 at
210000 and x0.01 at 250000 of 270000. That is what produced the published numbers, so it is used
here. Otherwise the 24-epoch recipe (temperature 20, no offset).
"""
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from .focus_detr_r50_4scale_24ep import ITERS_PER_EPOCH, dataloader, model, optimizer, train  # noqa: F401

train.max_iter = 36 * ITERS_PER_EPOCH  # 270000
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01], milestones=[train.max_iter - 60000, train.max_iter - 20000, train.max_iter]),
    warmup_length=1000 / train.max_iter,
    warmup_method="linear",
    warmup_factor=0.001,
)
train.output_dir = "./output/focus_detr_r50_4scale_36ep"
