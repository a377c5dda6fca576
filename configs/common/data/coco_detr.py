"""COCO 2017 with DETR's data pipeline.

Train: Detectron2's builtin "coco_2017_train" (under $DETECTRON2_DATASETS, default
./datasets), images without objects kept (filter_empty=False) as in DETR, DETR's
augmentation: random flip, then with probability 0.5 either a multi-scale resize
(short edge 480..800, max 1333) or resize (400/500/600) + random crop (384..600) +
the multi-scale resize. Total batch size 16 over all workers. The train loader is
d2detr's build_detr_train_loader (Detectron2's arguments): its order and augmentations are
functions of (seed, iteration), so `--resume` continues exactly (no aspect-ratio grouping).
Test: "coco_2017_val", short edge 800 (max 1333), COCOEvaluator with the official
pycocotools evaluation (use_fast_impl=False; Detectron2 without _C has no fast one).
"""
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts
from detectron2.evaluation import COCOEvaluator
from omegaconf import OmegaConf

from d2detr.data.build import build_detr_train_loader
from d2detr.data.detr_dataset_mapper import (
    DetrDatasetMapper,
    build_detr_test_augmentation,
    build_detr_train_augmentation,
    build_detr_train_crop_augmentation,
)

dataloader = OmegaConf.create()

dataloader.train = L(build_detr_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_train", filter_empty=False),
    mapper=L(DetrDatasetMapper)(
        is_train=True,
        augmentation=L(build_detr_train_augmentation)(),
        augmentation_with_crop=L(build_detr_train_crop_augmentation)(),
        image_format="RGB",
    ),
    total_batch_size=16,
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(DetrDatasetMapper)(
        is_train=False,
        augmentation=L(build_detr_test_augmentation)(),
        image_format="RGB",
    ),
    num_workers=4,
)

# output_dir None: train_net fills in <train.output_dir>/inference.
dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    output_dir=None,
    use_fast_impl=False,
)
