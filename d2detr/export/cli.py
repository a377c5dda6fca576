"""Pieces shared by the command-line tools (``tools/export_model.py``, ``demo.py``,
``visualize_attention.py``, ``analyze_model.py``): a model from a LazyConfig with
``key=value`` overrides and its checkpoint, the class names of its dataset, the test-time
resize evaluation uses, and images as ``[3, H, W]`` uint8 tensors in the model's channel order."""
import logging
import os
from typing import List, Optional, Sequence

import numpy as np
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import transforms as T
from omegaconf import OmegaConf
from torch import nn

from d2detr.checkpoint.loading import DetrCheckpointer, apply_checkpoint_overrides, use_ema_weights

__all__ = [
    "load_config",
    "build_model",
    "dataset_class_names",
    "test_time_augmentations",
    "read_image",
    "IMAGE_EXTENSIONS",
    "list_images",
]

logger = logging.getLogger("d2detr")

#: The test-time resize of the COCO models, for a config without ``dataloader.test``.
DEFAULT_MIN_SIZE, DEFAULT_MAX_SIZE = 800, 1333
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def load_config(config_file: str, opts: Sequence[str] = ()):
    """``LazyConfig.load`` + ``key=value`` overrides, plus the overrides stored in the checkpoint
    ``train.init_checkpoint`` (a converted one; the command line's keys win, see
    :func:`d2detr.checkpoint.apply_checkpoint_overrides`). Works with a full training config
    (``model``, ``dataloader``, ``train``, ...) or a model-only config (``model``)."""
    cfg = LazyConfig.load(config_file)
    cfg = LazyConfig.apply_overrides(cfg, list(opts))
    apply_checkpoint_overrides(cfg, list(opts))
    return cfg


def _get(cfg, dotted: str, default=None):
    node = cfg
    for key in dotted.split("."):
        try:
            if node is None or key not in node:
                return default
        except TypeError:
            return default
        node = node[key]
    return node


def build_model(cfg, device: str = "cpu", weights: Optional[str] = None) -> nn.Module:
    """Instantiates ``cfg.model`` in eval mode on ``device`` and loads ``weights`` (default:
    ``cfg.train.init_checkpoint`` when the config has one) with :class:`DetrCheckpointer`: the
    checkpoint's EMA weights when it has them, unless ``train.model_ema.use_for_eval=False``."""
    model = instantiate(cfg.model)
    model.to(device).eval()
    weights = weights if weights is not None else _get(cfg, "train.init_checkpoint", "")
    if weights:
        DetrCheckpointer(model, use_ema=use_ema_weights(cfg)).load(weights)
    else:
        logger.warning("no checkpoint given (train.init_checkpoint=...): the model has its initial weights")
    return model


def dataset_class_names(cfg=None, dataset: Optional[str] = None, num_classes: Optional[int] = None) -> List[str]:
    """``thing_classes`` of ``dataset`` (default: the config's test dataset); falls back to
    ``["0", "1", ...]`` when unknown. d2detr's built-in datasets are registered first."""
    import d2detr.data.datasets  # noqa: F401  registers d2detr's datasets in Detectron2's catalogs
    from detectron2.data import MetadataCatalog

    if dataset is None and cfg is not None:
        names = _get(cfg, "dataloader.test.dataset.names")
        if isinstance(names, str):
            dataset = names
        elif names:
            dataset = list(names)[0]
    if dataset:
        classes = MetadataCatalog.get(dataset).get("thing_classes", None)
        if classes:
            return list(classes)
        logger.warning(f"dataset {dataset!r} has no thing_classes; numbering the classes")
    n = num_classes if num_classes is not None else int(_get(cfg, "model.num_classes", 0) or 0)
    return [str(i) for i in range(n)]


def test_time_augmentations(cfg, min_size=None, max_size=None):
    """``(augmentations, description)``: the test-time resize. ``min_size``/``max_size`` given:
    ``ResizeShortestEdge(min_size, max_size)`` (``min_size`` 0: none); else the config's
    ``dataloader.test.mapper.augmentation`` (what evaluation uses); else shortest edge 800,
    longest 1333."""
    if min_size is not None or max_size is not None:
        if min_size == 0:
            return [], "none (--min-size 0)"
        min_size = DEFAULT_MIN_SIZE if min_size is None else min_size
        max_size = DEFAULT_MAX_SIZE if max_size is None else max_size
        if min_size < 0 or max_size <= 0:
            raise ValueError(f"--min-size must be >= 0 and --max-size > 0, got {min_size}, {max_size}")
        return [T.ResizeShortestEdge(min_size, max_size)], f"ResizeShortestEdge({min_size}, {max_size}) from the flags"
    augs = OmegaConf.select(cfg, "dataloader.test.mapper.augmentation", default=None)
    if augs is None:
        aug = T.ResizeShortestEdge(DEFAULT_MIN_SIZE, DEFAULT_MAX_SIZE)
        return [aug], f"{aug} (the config has no dataloader.test.mapper.augmentation)"
    augs = instantiate(augs)
    augs = [augs] if isinstance(augs, (T.Augmentation, T.Transform)) else list(augs)  # a list, or a ListConfig
    for aug in augs:
        if not isinstance(aug, (T.Augmentation, T.Transform)):
            raise TypeError(f"dataloader.test.mapper.augmentation holds {aug!r}, not a Detectron2 augmentation")
    return augs, f"{', '.join(map(str, augs)) or 'none'} (the config's test mapper)"


def read_image(path: str, input_format: str = "RGB") -> torch.Tensor:
    """An image file -> ``[3, H, W]`` uint8 tensor in ``input_format`` ("RGB" or "BGR")."""
    from detectron2.data.detection_utils import read_image as d2_read_image

    img = d2_read_image(path, format=input_format)  # HWC uint8, EXIF orientation applied
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def list_images(inputs: Sequence[str]) -> List[str]:
    """Files and folders (their images, sorted, not recursive) -> image paths."""
    paths: List[str] = []
    for item in inputs:
        if os.path.isdir(item):
            paths += sorted(
                os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_EXTENSIONS)
            )
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"no such file or folder: {item}")
    return paths
