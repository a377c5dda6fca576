"""Focus-DETR R50 4-scale, 24 epochs (paper / release: 50.3 AP).

The 12-epoch recipe with the release's 24-epoch changes: 180000 iterations, lr x0.1 at 150000
(epoch 20), and the position embedding of DAB-DETR / the official DINO (temperature 20, no -0.5
offset).
"""
from .focus_detr_r50_4scale_12ep import ITERS_PER_EPOCH, dataloader, model, optimizer, release_scheduler, train  # noqa: F401

model.position_embedding.temperature = 20
model.position_embedding.offset = 0.0
lr_multiplier = release_scheduler(24, 20)
train.max_iter = 24 * ITERS_PER_EPOCH
train.output_dir = "./output/focus_detr_r50_4scale_24ep"
