"""Dataset mapper and augmentations of the official DETR / Deformable DETR."""
import copy
import logging
import sys
from typing import List, Optional, Sequence

import numpy as np
import torch
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

__all__ = [
    "DetrDatasetMapper",
    "DETR_TRAIN_SCALES",
    "build_detr_train_augmentation",
    "build_detr_train_crop_augmentation",
    "build_detr_test_augmentation",
    "to_three_channels",
]

#: The official multi-scale training sizes: 480, 512, ..., 800.
DETR_TRAIN_SCALES = tuple(range(480, 801, 32))


def _flip(random_flip: str) -> List[T.Augmentation]:
    if random_flip == "none":
        return []
    if random_flip not in ("horizontal", "vertical"):
        raise ValueError(f"random_flip must be 'horizontal', 'vertical' or 'none', got {random_flip!r}")
    return [T.RandomFlip(horizontal=random_flip == "horizontal", vertical=random_flip == "vertical")]


def build_detr_train_augmentation(
    min_sizes: Sequence[int] = DETR_TRAIN_SCALES,
    max_size: int = 1333,
    random_flip: str = "horizontal",
) -> List[T.Augmentation]:
    """RandomFlip + multi-scale ResizeShortestEdge (sample_style "choice")."""
    augs = _flip(random_flip)
    augs.append(T.ResizeShortestEdge(short_edge_length=tuple(min_sizes), max_size=max_size, sample_style="choice"))
    return augs


def build_detr_train_crop_augmentation(
    min_sizes: Sequence[int] = DETR_TRAIN_SCALES,
    max_size: int = 1333,
    crop_resize_sizes: Sequence[int] = (400, 500, 600),
    crop_size: Sequence[int] = (384, 600),
    random_flip: str = "horizontal",
) -> List[T.Augmentation]:
    """The other branch of DETR's RandomSelect: RandomFlip, resize the short edge to one of
    ``crop_resize_sizes`` (no max size), random crop with sides in ``crop_size`` (absolute
    range), then the multi-scale resize."""
    augs = _flip(random_flip)
    augs += [
        T.ResizeShortestEdge(short_edge_length=tuple(crop_resize_sizes), max_size=sys.maxsize, sample_style="choice"),
        T.RandomCrop(crop_type="absolute_range", crop_size=tuple(crop_size)),
        T.ResizeShortestEdge(short_edge_length=tuple(min_sizes), max_size=max_size, sample_style="choice"),
    ]
    return augs


def build_detr_test_augmentation(min_size: int = 800, max_size: int = 1333) -> List[T.Augmentation]:
    return [T.ResizeShortestEdge(short_edge_length=min_size, max_size=max_size)]


def to_three_channels(image: np.ndarray) -> np.ndarray:
    """HW / HW1 (grayscale) -> HW3 by repetition; HW4 (RGBA/BGRA) -> HW3 by dropping alpha."""
    if image.ndim == 2:
        image = image[:, :, None]
    c = image.shape[2]
    if c == 1:
        return np.repeat(image, 3, axis=2)
    if c == 4:
        return image[:, :, :3]
    if c == 3:
        return image
    raise ValueError(f"cannot convert an image with {c} channels to 3 channels")


class DetrDatasetMapper:
    """Maps a Detectron2 dataset dict to the model's input, with DETR's augmentations.

    In training, with probability 0.5 ``augmentation`` is applied, otherwise
    ``augmentation_with_crop`` (when given). Boxes are clipped to the image and
    boxes left empty (e.g. by the crop) are dropped; images without any object
    are kept with empty ``instances``. Grayscale and RGBA images become 3-channel
    ``image_format`` ("RGB" or "BGR") images. Crowd annotations are ignored.
    In inference, annotations are removed.

    ``num_classes`` (set by ``d2detr.engine.do_train`` from the model when the config leaves
    it None): a training annotation whose ``category_id`` is not in ``[0, num_classes)`` is a
    ``ValueError`` naming the record (file name and image id), instead of being trained as
    "no object" (softmax models) or failing inside the loss (focal models).
    """

    def __init__(
        self,
        is_train: bool = True,
        augmentation: Optional[Sequence[T.Augmentation]] = None,
        augmentation_with_crop: Optional[Sequence[T.Augmentation]] = None,
        image_format: str = "RGB",
        mask_on: bool = False,
        num_classes: Optional[int] = None,
    ):
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if augmentation is None:
            augmentation = build_detr_train_augmentation() if is_train else build_detr_test_augmentation()
        self.is_train = is_train
        self.augmentation = T.AugmentationList(list(augmentation))
        self.augmentation_with_crop = (
            None if augmentation_with_crop is None else T.AugmentationList(list(augmentation_with_crop))
        )
        self.image_format = image_format
        self.mask_on = mask_on
        if num_classes is not None and int(num_classes) <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = None if num_classes is None else int(num_classes)
        logging.getLogger(__name__).info(
            "[DetrDatasetMapper] augmentation: %s; with crop: %s", augmentation, augmentation_with_crop
        )

    def _augmentations(self) -> T.AugmentationList:
        if self.is_train and self.augmentation_with_crop is not None and np.random.rand() < 0.5:
            return self.augmentation_with_crop
        return self.augmentation

    def _check_category(self, obj, record) -> None:
        if self.num_classes is None:
            return
        c = obj.get("category_id")
        if not isinstance(c, (int, np.integer)) or not 0 <= c < self.num_classes:
            raise ValueError(
                f"dataset record {record.get('file_name')!r} (image_id {record.get('image_id')!r}): "
                f"category_id {c!r} is not a class of the model (num_classes={self.num_classes}: "
                f"0..{self.num_classes - 1}); fix the dataset's category ids or model.num_classes"
            )

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        image = to_three_channels(image)
        utils.check_image_size(dataset_dict, image)

        aug_input = T.AugInput(image)
        transforms = self._augmentations()(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        if not self.is_train:
            dataset_dict.pop("annotations", None)
            dataset_dict.pop("sem_seg_file_name", None)
            return dataset_dict

        annos = []
        for obj in dataset_dict.pop("annotations", []):
            if obj.get("iscrowd", 0) != 0:
                continue
            self._check_category(obj, dataset_dict)
            if not self.mask_on:
                obj.pop("segmentation", None)
            obj.pop("keypoints", None)
            annos.append(utils.transform_instance_annotations(obj, transforms, image_shape))
        instances = utils.annotations_to_instances(annos, image_shape, mask_format="polygon")
        dataset_dict["instances"] = utils.filter_empty_instances(instances, by_mask=self.mask_on)
        return dataset_dict
