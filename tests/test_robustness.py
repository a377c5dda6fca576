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


# --------------------------------------------------------------------------- every method under DDP
def _aux_off_model(tmp_path, method):
    """The tiny real model of ``method`` with ``aux_loss=False`` where the method has the switch."""
    import inspect

    from detectron2.config import LazyConfig
    from detectron2.utils.registry import locate
    from tiny_configs import write_tiny_config

    config = write_tiny_config(tmp_path, method)
    cfg = LazyConfig.load(config)
    target = cfg.model._target_
    target = locate(target) if isinstance(target, str) else target
    has_aux = "aux_loss" in inspect.signature(target).parameters
    if has_aux:
        cfg.model.aux_loss = False
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    return model, has_aux


def _empty_batch(batch):
    from detectron2.structures import Boxes, Instances

    for x in batch:
        inst = Instances(x["instances"].image_size)
        inst.gt_boxes = Boxes(torch.zeros(0, 4))
        inst.gt_classes = torch.zeros(0, dtype=torch.long)
        x["instances"] = inst
    return batch


@pytest.mark.parametrize("method", sorted(__import__("tiny_configs").TINY_METHODS))
def test_every_parameter_gets_a_gradient_with_aux_loss_off(tmp_path, method):
    """DistributedDataParallel with find_unused_parameters=False (configs/common/train.py) needs a
    gradient for every trainable parameter on every worker in every step. With aux_loss=False
    (box refinement: the intermediate heads have no loss) and in a batch without any object
    (denoising has nothing to embed), every method still gives one (zero ones through
    ``connect_unused``)."""
    from helpers import synthetic_batch

    model, _ = _aux_off_model(tmp_path, method)
    model.train()
    for batch in (synthetic_batch(2, 64), _empty_batch(synthetic_batch(2, 64))):
        model.zero_grad(set_to_none=True)
        losses = model(batch)
        sum(losses.values()).backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, f"{method}: no gradient for {missing[:8]} ({len(missing)} in all)"


# --------------------------------------------------------------------------- bad labels, overflow
def _outputs(num_logits, q=4):
    g = torch.Generator().manual_seed(0)
    return {"pred_logits": torch.randn(1, q, num_logits, generator=g),
            "pred_boxes": torch.rand(1, q, 4, generator=g) * 0.5 + 0.25}


@pytest.mark.parametrize("use_focal", [True, False])
def test_matcher_rejects_labels_outside_the_model_classes(use_focal):
    """Label 3 of a 3-class model: with softmax logits (4 = 3 + no-object) it used to be trained
    as "no object", with focal logits it failed as an IndexError; now both name the problem.
    Label 2 is fine."""
    from d2detr.modeling.matcher import HungarianMatcher

    matcher = HungarianMatcher(use_focal=use_focal)
    outputs = _outputs(3 if use_focal else 4)
    box = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    rows, cols = matcher(outputs, [{"labels": torch.tensor([2]), "boxes": box}])[0]
    assert len(rows) == len(cols) == 1
    with pytest.raises(ValueError, match=r"labels outside 0\.\.2 \(the model has 3 classes\) \(labels \[3\] here\)"):
        matcher(outputs, [{"labels": torch.tensor([3]), "boxes": box}])


@pytest.mark.parametrize("method", ["dino", "focus_detr"])
def test_denoising_models_name_a_label_outside_the_classes(tmp_path, method):
    """DINO / Focus-DETR embed the ground-truth labels for denoising before the matcher runs: a label
    of ``num_classes`` used to fail there as an IndexError from ``nn.Embedding``; a real model called
    outside ``do_train`` now names the problem as the matcher does. The last valid label trains."""
    from detectron2.structures import Boxes, Instances

    model, _ = _aux_off_model(tmp_path, method)
    model.train()
    num_classes = model.num_classes

    def batch_with_label(label):
        inst = Instances((64, 64))
        inst.gt_boxes = Boxes(torch.tensor([[8.0, 8.0, 40.0, 40.0]]))
        inst.gt_classes = torch.tensor([label])
        return [{"image": torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8), "instances": inst}]

    losses = model(batch_with_label(num_classes - 1))
    assert all(torch.isfinite(v) for v in losses.values())
    pattern = rf"labels outside 0\.\.{num_classes - 1} \(the model has {num_classes} classes\) \(labels \[{num_classes}\] here\)"
    with pytest.raises(ValueError, match=pattern):
        model(batch_with_label(num_classes))
    with pytest.raises(ValueError, match=r"\(labels \[-1\] here\)"):
        model(batch_with_label(-1))


def test_matcher_rejects_nonfinite_predictions_even_without_targets():
    """The check runs before matching, also for a batch without objects (whose matching would
    return at once): under DDP every worker must take part in the same reduction."""
    from d2detr.modeling.matcher import HungarianMatcher

    outputs = _outputs(3)
    outputs["pred_boxes"][0, 1, 0] = float("nan")
    empty = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    with pytest.raises(FloatingPointError, match="non-finite predictions"):
        HungarianMatcher(use_focal=True)(outputs, [empty])


def test_mapper_names_the_record_of_a_bad_category(tmp_path):
    path = _write(tmp_path, "bad_label", 40, 50)
    rec = _record(path, 40, 50, [(5, 5, 30, 35)])  # category_id 1
    rec["image_id"] = 17
    assert len(DetrDatasetMapper(is_train=True, augmentation=[], num_classes=2)(rec)["instances"]) == 1
    with pytest.raises(ValueError, match=r"bad_label\.png' \(image_id 17\): category_id 1 .*num_classes=1"):
        DetrDatasetMapper(is_train=True, augmentation=[], num_classes=1)(rec)
