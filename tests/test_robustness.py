"""Training survives the data users actually have: images without objects, zero-area and
out-of-image boxes, grayscale and RGBA files, and images smaller than the largest stride.

Each case goes through the real path: image file -> DetrDatasetMapper -> Deformable DETR
(4 levels, so the extra level has stride 64) -> weighted losses -> backward.
"""
import math
import zlib

import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from PIL import Image

from d2detr.data import DetrDatasetMapper

CONFIG = "projects/deformable_detr/configs/models/deformable_detr_mobilenetv2.py"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LazyConfig.load(CONFIG)
    cfg.model.backbone.pretrained = False
    cfg.model.neck.num_outs = 4  # extra stride-64 level, as in the R50 model
    cfg.model.transformer.num_feature_levels = 4
    cfg.model.transformer.encoder.encoder_layer.num_levels = 4
    cfg.model.transformer.decoder.decoder_layer.num_levels = 4
    cfg.model.num_classes = 2
    cfg.model.num_queries = 10
    for part in (cfg.model.transformer.encoder, cfg.model.transformer.decoder):
        part.num_layers = 1
    m = instantiate(cfg.model)
    m.train()
    return m


def _write(tmp_path, name, h, w, mode="RGB"):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    channels = {"RGB": 3, "RGBA": 4, "L": None}[mode]
    shape = (h, w) if channels is None else (h, w, channels)
    path = tmp_path / f"{name}.png"
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(path)
    return str(path)


def _record(file_name, h, w, boxes):
    return {
        "file_name": file_name,
        "height": h,
        "width": w,
        "image_id": file_name,
        "annotations": [
            {"bbox": list(b), "bbox_mode": BoxMode.XYXY_ABS, "category_id": 1, "iscrowd": 0} for b in boxes
        ],
    }


def _train_step(model, records):
    mapper = DetrDatasetMapper(is_train=True, augmentation=[T.RandomFlip()], augmentation_with_crop=None)
    batch = [mapper(r) for r in records]
    model.zero_grad()
    losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total), {k: float(v) for k, v in losses.items()}
    total.backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    return batch, losses


def test_images_without_objects(model, tmp_path):
    recs = [_record(_write(tmp_path, f"empty{i}", 96, 128), 96, 128, []) for i in range(2)]
    batch, losses = _train_step(model, recs)
    assert all(len(b["instances"]) == 0 for b in batch)
    # With nothing to match, only the classification loss (every query is background) is non-zero.
    assert losses["loss_class"] > 0
    assert losses["loss_bbox"] == 0 and losses["loss_giou"] == 0


def test_zero_area_and_out_of_image_boxes(model, tmp_path):
    boxes = [
        (10, 10, 10, 40),  # zero width
        (20, 20, 50, 20),  # zero height
        (-30, -20, 40, 50),  # partly outside: clipped
        (200, 150, 260, 190),  # entirely outside: dropped
        (30, 30, 70, 80),  # ordinary
    ]
    recs = [_record(_write(tmp_path, "odd", 96, 128), 96, 128, boxes)]
    batch, _ = _train_step(model, recs)
    kept = batch[0]["instances"].gt_boxes.tensor
    assert len(kept) == 2
    h, w = batch[0]["image"].shape[1:]
    assert (kept[:, 0] >= 0).all() and (kept[:, 1] >= 0).all()
    assert (kept[:, 2] <= w).all() and (kept[:, 3] <= h).all()
    assert ((kept[:, 2] - kept[:, 0]) > 0).all() and ((kept[:, 3] - kept[:, 1]) > 0).all()


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grayscale_and_rgba_files(model, tmp_path, mode):
    recs = [_record(_write(tmp_path, f"img_{mode}", 80, 100, mode), 80, 100, [(10, 10, 50, 60)])]
    batch, _ = _train_step(model, recs)
    assert batch[0]["image"].shape == (3, 80, 100)


def test_images_smaller_than_the_largest_stride(model, tmp_path):
    # 40x50 px: the stride-64 level has a single cell and stride 32 is 2x2; batched with a
    # larger image so the small one is mostly padding.
    recs = [
        _record(_write(tmp_path, "small", 40, 50), 40, 50, [(5, 5, 30, 35)]),
        _record(_write(tmp_path, "large", 96, 128), 96, 128, [(10, 10, 60, 70)]),
    ]
    _train_step(model, recs)


def test_inference_on_a_tiny_image_returns_boxes_inside_it(model, tmp_path):
    model.eval()
    try:
        mapper = DetrDatasetMapper(is_train=False, augmentation=[])
        rec = _record(_write(tmp_path, "tiny", 20, 30), 20, 30, [])
        with torch.no_grad():
            out = model([mapper(rec)])[0]["instances"]
    finally:
        model.train()
    boxes = out.pred_boxes.tensor
    assert out.image_size == (20, 30)
    assert len(boxes) > 0 and torch.isfinite(boxes).all()
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= 30 + 1e-4).all()
    assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= 20 + 1e-4).all()
    assert not math.isnan(float(out.scores.sum()))
