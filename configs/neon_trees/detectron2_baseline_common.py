"""What the two Detectron2 baselines (``faster_rcnn_mobilenetv2_fpn.py``, ``retinanet_mobilenetv2_fpn.py``)
share, for ``tools/compare_detectron2_baselines.py``: everything of ``common.py`` that is not the
model or the optimizer -- the same images, augmentations (flips, short edges 352..480, test 416),
batch 2, seed, evaluator -- but Detectron2's own ``DatasetMapper`` (absolute-coordinate
``Instances``, what ``GeneralizedRCNN`` and ``RetinaNet`` read) instead of ``DetrDatasetMapper``.

The recipe, chosen for this data and a CPU budget of minutes (``docs/detectron2_baselines.md``):

* backbone: the same ImageNet MobileNetV2 as the DETR configs (offline weights, FrozenBN,
  stem and stride-4 stage frozen) under Detectron2's ``FPN`` with 256 channels (its default);
* anchors for crowns of 8-108 px (median ~40 px at the 416 test size) instead of COCO's 32-512:
  one octave smaller, so the smallest level's anchor is 16 px;
* SGD (Detectron2's ``common/optim.py``: momentum 0.9, weight decay 1e-4, none on norms), lr
  0.01 at batch 2 -- 4x Detectron2's linear scaling of 0.02 @ 16, because a budget of minutes
  gives ~10^3 steps, not 9x10^4 (see the doc for the lr sweep) --, the same schedule shape as
  the DETR configs (3 % linear warmup from 0.01x, x0.1 at 80 %), no gradient clipping (the
  RetinaNet config replaces the SGD by AdamW 1e-4: with SGD it did not learn at this budget);
* Detectron2's test settings: score threshold 0.05, 100 detections per image.
"""
from detectron2.config import LazyCall as L
from detectron2.data import DatasetMapper, build_detection_test_loader, build_detection_train_loader
from detectron2.data import get_detection_dataset_dicts
from detectron2.data import transforms as T
from detectron2.model_zoo import get_config
from omegaconf import OmegaConf

from ..common.optim import AdamW as _common_adamw
from .common import MOBILENET_CHANNELS, TEST_SIZE, TRAIN_SIZES, lr_multiplier, train  # noqa: F401
from .common import dataloader as _detr_dataloader

#: ImageNet mean / std in RGB order on the 0-255 scale (torchvision's MobileNetV2 normalisation).
PIXEL_MEAN = [123.675, 116.280, 103.530]
PIXEL_STD = [58.395, 57.120, 57.375]
FPN_CHANNELS = 256

dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="neon_trees_train", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.RandomFlip)(horizontal=True, vertical=False),
            L(T.RandomFlip)(horizontal=False, vertical=True),
            L(T.ResizeShortestEdge)(short_edge_length=TRAIN_SIZES, max_size=800, sample_style="choice"),
        ],
        image_format="RGB",
    ),
    total_batch_size=2,
    num_workers=0,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="neon_trees_val", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=TEST_SIZE, max_size=800)],
        image_format="RGB",
    ),
    num_workers=0,
)
dataloader.evaluator = _detr_dataloader.evaluator

optimizer = get_config("common/optim.py").SGD
optimizer.lr = 0.01

#: The AdamW a baseline can take instead (the RetinaNet does; ``faster_rcnn_mobilenetv2_fpn_adamw.py``
#: checks the Faster R-CNN with it): lr 1e-4, weight decay 1e-4, every parameter at the full lr.
adamw_optimizer = _common_adamw
adamw_optimizer.lr = 1e-4
adamw_optimizer.params.lr_factor_func.factors = {}

train.clip_grad.enabled = False
