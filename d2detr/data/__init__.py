from .build import ResumableTrainingSampler, build_detr_train_loader, resumable_sampler
from .detr_dataset_mapper import (
    DETR_TRAIN_SCALES,
    DetrDatasetMapper,
    build_detr_test_augmentation,
    build_detr_train_augmentation,
    build_detr_train_crop_augmentation,
    to_three_channels,
)
from .transforms import RandomRot90, Rot90Transform
from . import datasets  # noqa: F401  registers the built-in datasets, as detectron2.data does
