"""RNNDet R50, 100 queries, 1x (12 epochs) on COCO, NF = 6 decoder layers (the initial stage + 5
weight-tied refinement steps, FFNDet's depth).

The training recipe is the DEQDet code base's FFNDet baseline (``MCG-NJU/DEQDet``,
``projects/configs/ffndet_r50_1x_coco.py``) = DEQDet's 1x recipe: AdamW lr 2.5e-5, weight decay
0.01, the decoder at lr x4 and weight decay x10, clip 1, batch 16, 12 epochs with lr x0.1 after
epochs 8 and 11, warm-up 500 iterations; mmdet's 1x data. The other depths of the paper:
``rnndet_r50_nf{8,12,16,20}_12ep.py``.
"""
from detectron2.config import LazyCall as L

from d2detr.engine.param_groups import LrFactorByName, get_optimizer_params_with_factors

from ....configs.common.coco_schedule import default_coco_epoch_scheduler, epochs_to_iters
from ....configs.common.data.coco_mmdet_1x import MMDET_COCO_TRAIN_IMAGES, dataloader
from ....configs.common.optim import AdamW as optimizer
from ....configs.common.train import train
from .models.rnndet_r50 import model

BATCH_SIZE = 16
EPOCHS, LR_DROPS, WARMUP_ITERS = 12, [8, 11], 500
SCHEDULE = dict(batch_size=BATCH_SIZE, num_images=MMDET_COCO_TRAIN_IMAGES)
DECODER_LR_FACTORS = {"init_stage": 4.0, "refine_stage": 4.0}
DECODER_WEIGHT_DECAY_FACTORS = {"init_stage": 10.0, "refine_stage": 10.0}

model.refinement_steps = 5
dataloader.train.total_batch_size = BATCH_SIZE

optimizer.lr = 2.5e-5
optimizer.weight_decay = 0.01
optimizer.params = L(get_optimizer_params_with_factors)(
    base_lr="${..lr}",
    weight_decay="${..weight_decay}",
    lr_factor_func=L(LrFactorByName)(factors=DECODER_LR_FACTORS),
    weight_decay_factor_func=L(LrFactorByName)(factors=DECODER_WEIGHT_DECAY_FACTORS),
)

lr_multiplier = default_coco_epoch_scheduler(EPOCHS, LR_DROPS, warmup_iters=WARMUP_ITERS, warmup_factor=0.001, **SCHEDULE)

train.max_iter = epochs_to_iters(EPOCHS, **SCHEDULE)
train.clip_grad.enabled = True
train.clip_grad.params.max_norm = 1.0
train.checkpointer.period = epochs_to_iters(1, **SCHEDULE)
train.eval_period = epochs_to_iters(1, **SCHEDULE)
train.output_dir = "./output/rnndet_r50_nf6_12ep"
