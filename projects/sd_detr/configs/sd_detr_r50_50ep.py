"""SD-DETR R50, 50 epochs on COCO (paper: 45.5 AP; Conditional DETR R50 50 ep: 40.9).

The paper trains on top of Conditional DETR and gives no other recipe, so this is Conditional
DETR's official one (Atten4Vis/ConditionalDETR): AdamW lr 1e-4 (backbone 1e-5), weight decay
1e-4, gradient clipping at norm 0.1, total batch 16, 50 epochs with the learning rate dropped
x0.1 after epoch 40; DETR's augmentation from configs/common/data.

Initialise the backbone from ImageNet: a torchvision ResNet-50 checkpoint converted with
``tools/convert_checkpoint.py``, then ``train.init_checkpoint=r50.pth``. The ablation rows are
overrides of the model flags (see ``models/sd_detr_r50.py`` and the project README).
"""
from ....configs.common.coco_schedule import default_coco_epoch_scheduler, epochs_to_iters
from ....configs.common.data.coco_detr import dataloader
from ....configs.common.optim import AdamW as optimizer
from ....configs.common.train import train
from .models.sd_detr_r50 import model

BATCH_SIZE = 16
EPOCHS, LR_DROP = 50, 40

dataloader.train.total_batch_size = BATCH_SIZE

optimizer.lr = 1e-4
optimizer.weight_decay = 1e-4
optimizer.params.lr_factor_func.factors = {"backbone": 0.1}  # backbone lr 1e-5

lr_multiplier = default_coco_epoch_scheduler(EPOCHS, LR_DROP, batch_size=BATCH_SIZE)

train.max_iter = epochs_to_iters(EPOCHS, batch_size=BATCH_SIZE)
train.clip_grad.enabled = True
train.clip_grad.params.max_norm = 0.1
train.checkpointer.period = epochs_to_iters(5, batch_size=BATCH_SIZE)
train.eval_period = epochs_to_iters(5, batch_size=BATCH_SIZE)
train.output_dir = "./output/sd_detr_r50_50ep"
