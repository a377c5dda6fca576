import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.structures import Boxes, Instances

from d2detr.modeling.criterion import SetCriterion
from d2detr.modeling.matcher import HungarianMatcher
from d2detr.modeling.meta_arch import DETRBase

BOX = torch.tensor([0.40, 0.30, 0.20, 0.10])  # normalised cxcywh predicted by query 1


class FakeDETR(DETRBase):
    """Predicts BOX with class 2 on query 1, and junk elsewhere."""

    def __init__(self, use_focal, **kw):
        super().__init__(backbone=torch.nn.Identity(), criterion=kw.pop("criterion", None), num_classes=3,
                         use_focal=use_focal, select_box_nums_for_evaluation=kw.pop("k", 5), **kw)
        self.bias = torch.nn.Parameter(torch.zeros(()))
        self.seen = None

    def forward_features(self, images, masks):
        self.seen = (images, masks)
        B, Q = len(images), 4
        C = 3 if self.use_focal else 4
        logits = torch.full((B, Q, C), -5.0) + self.bias
        logits[:, 1, 2] = 5.0
        boxes = torch.tensor([0.5, 0.5, 0.1, 0.1]).repeat(B, Q, 1) + self.bias
        boxes[:, 1] = BOX
        return {"pred_logits": logits, "pred_boxes": boxes}


def _inputs(sizes_orig, resized):
    out = []
    for (h, w), (rh, rw) in zip(sizes_orig, resized):
        out.append({"image": torch.randint(0, 255, (3, rh, rw), dtype=torch.uint8), "height": h, "width": w})
    return out


@pytest.mark.parametrize("use_focal", [True, False])
def test_inference_returns_absolute_xyxy_in_original_image(use_focal):
    model = FakeDETR(use_focal).eval()
    # image 0: 200x300 resized (as a mapper would) to 100x150; image 1: 90x60 kept as is
    inputs = _inputs([(200, 300), (90, 60)], [(100, 150), (90, 60)])
    with torch.no_grad():
        res = model(inputs)
    for r, (h, w) in zip(res, [(200, 300), (90, 60)]):
        inst = r["instances"]
        assert inst.image_size == (h, w)
        best = inst.scores.argmax()
        assert int(inst.pred_classes[best]) == 2 and float(inst.scores[best]) > 0.9
        cx, cy, bw, bh = BOX.tolist()
        ref = torch.tensor([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
        torch.testing.assert_close(inst.pred_boxes.tensor[best], ref)
        assert len(inst) <= 5
        assert (inst.pred_classes < 3).all()  # never the no-object class


def test_a_real_resize_end_to_end():
    """Resize with the test augmentation and come back to the original coordinates."""
    orig = np.zeros((240, 320, 3), dtype=np.uint8)
    aug = T.AugmentationList([T.ResizeShortestEdge(96, 1333)])
    inp = T.AugInput(orig)
    aug(inp)
    img = torch.as_tensor(inp.image.transpose(2, 0, 1).copy())
    assert img.shape[1:] == (96, 128)
    res = FakeDETR(True).eval()([{"image": img, "height": 240, "width": 320}])[0]["instances"]
    best = res.scores.argmax()
    torch.testing.assert_close(res.pred_boxes.tensor[best], torch.tensor([96.0, 60.0, 160.0, 84.0]))


def test_preprocess_masks_and_normalisation():
    model = FakeDETR(True, size_divisibility=32, input_format="BGR")
    img0 = torch.zeros(3, 50, 70, dtype=torch.uint8)
    img0[0] = 10  # B channel in BGR
    inputs = [{"image": img0}, {"image": torch.zeros(3, 64, 40, dtype=torch.uint8)}]
    images, masks = model.preprocess_image(inputs)
    assert images.tensor.shape == (2, 3, 64, 96)
    assert images.image_sizes == [(50, 70), (64, 40)]
    assert masks.dtype == torch.bool and masks.shape == (2, 64, 96)
    assert not masks[0, :50, :70].any() and masks[0, 50:].all() and masks[0, :, 70:].all()
    assert not masks[1, :, :40].any() and masks[1, :, 40:].all()
    # BGR input flipped to RGB before the (RGB) ImageNet normalisation; padding is 0
    mean, std = model.pixel_mean.flatten(), model.pixel_std.flatten()
    torch.testing.assert_close(images.tensor[0, 2, 0, 0], (10 - mean[2]) / std[2])
    torch.testing.assert_close(images.tensor[0, 0, 0, 0], (0 - mean[0]) / std[0])
    assert images.tensor[0, :, 60, 80].abs().sum() == 0
    with pytest.raises(ValueError, match="3-channel"):
        model.preprocess_image([{"image": torch.zeros(1, 8, 8)}])


def test_prepare_targets_normalises_by_unpadded_size():
    model = FakeDETR(True)
    inst = Instances((100, 200))
    inst.gt_boxes = Boxes(torch.tensor([[20.0, 10.0, 60.0, 50.0]]))
    inst.gt_classes = torch.tensor([2])
    empty = Instances((50, 50))
    empty.gt_boxes = Boxes(torch.zeros(0, 4))
    empty.gt_classes = torch.zeros(0, dtype=torch.long)
    t = model.prepare_targets([inst, empty])
    torch.testing.assert_close(t[0]["boxes"], torch.tensor([[0.2, 0.3, 0.2, 0.4]]))
    assert t[0]["labels"].tolist() == [2] and t[1]["boxes"].shape == (0, 4)


def test_training_returns_weighted_losses_and_can_pass_targets():
    crit = SetCriterion(3, HungarianMatcher(use_focal=True), {"loss_class": 2, "loss_bbox": 5, "loss_giou": 2},
                        use_focal=True)

    class WithTargets(FakeDETR):
        forward_features_needs_targets = True

        def forward_features(self, images, masks, targets=None):
            self.got = targets
            return super().forward_features(images, masks)

    model = WithTargets(True, criterion=crit).train()
    inputs = _inputs([(100, 150)], [(100, 150)])
    inst = Instances((100, 150))
    inst.gt_boxes = Boxes(torch.tensor([[45.0, 25.0, 75.0, 35.0]]))  # = BOX in pixels
    inst.gt_classes = torch.tensor([2])
    inputs[0]["instances"] = inst
    losses = model(inputs)
    assert set(losses) == {"loss_class", "loss_bbox", "loss_giou"}
    assert losses["loss_bbox"].item() < 1e-5 and losses["loss_giou"].item() < 1e-5
    torch.testing.assert_close(model.got[0]["boxes"], BOX[None])
    sum(losses.values()).backward()
    assert model.bias.grad is not None
    with pytest.raises(ValueError, match="instances"):
        model(_inputs([(10, 10)], [(10, 10)]))


def test_optional_nms_removes_same_class_duplicates_only():
    """test_nms_thresh: class-wise NMS over the selected detections, highest score kept. Boxes
    (normalised cxcywh, 100x100 image): A and its near-copy A' (IoU 0.82) of class 0, B far away of
    class 0, A'' = A's copy of class 1. Hand-computed: NMS at 0.7 drops A' only; at 0.9 none."""
    boxes = torch.tensor([[[0.30, 0.30, 0.20, 0.20], [0.31, 0.31, 0.20, 0.20],
                           [0.80, 0.80, 0.10, 0.10], [0.31, 0.31, 0.20, 0.20]]])
    logits = torch.full((1, 4, 2), -9.0)
    for q, (c, s) in enumerate([(0, 3.0), (0, 2.0), (0, 1.0), (1, 0.5)]):
        logits[0, q, c] = s
    outputs = {"pred_logits": logits, "pred_boxes": boxes}

    def kept(thresh):
        model = FakeDETR(use_focal=True, k=4, test_nms_thresh=thresh)
        model.num_classes = 2
        res = model.inference(outputs, [(100, 100)])[0]
        return [round(b, 1) for b in res.pred_boxes.tensor[:, 0].tolist()], res.pred_classes.tolist()

    assert kept(None) == ([20.0, 21.0, 75.0, 21.0], [0, 0, 0, 1])  # no NMS: the papers' set prediction
    assert kept(0.7) == ([20.0, 75.0, 21.0], [0, 0, 1])  # A' suppressed by A; A'' has another class
    assert kept(0.9) == ([20.0, 21.0, 75.0, 21.0], [0, 0, 0, 1])
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="test_nms_thresh"):
            FakeDETR(use_focal=True, test_nms_thresh=bad)
    # "None" from a command line (whose grammar spells None as null) is named, not a TypeError
    with pytest.raises(ValueError, match="=null"):
        FakeDETR(use_focal=True, test_nms_thresh="None")


def test_topk_candidates_go_through_nms_before_the_cap():
    """test_topk_candidates: the top candidates go into NMS and the K best survivors are kept, so a
    duplicate does not cost a slot (Detectron2's RetinaNet order). Boxes as above: A (score 3), its
    near-copy A' (2), B far away (1), C elsewhere (0.5), all class 0; K = 2, NMS at 0.7."""
    boxes = torch.tensor([[[0.30, 0.30, 0.20, 0.20], [0.31, 0.31, 0.20, 0.20],
                           [0.80, 0.80, 0.10, 0.10], [0.55, 0.20, 0.10, 0.10]]])
    logits = torch.full((1, 4, 1), -9.0)
    logits[0, :, 0] = torch.tensor([3.0, 2.0, 1.0, 0.5])
    outputs = {"pred_logits": logits, "pred_boxes": boxes}

    def kept(candidates, thresh=0.7):
        model = FakeDETR(use_focal=True, k=2, test_nms_thresh=thresh, test_topk_candidates=candidates)
        model.num_classes = 1
        res = model.inference(outputs, [(100, 100)])[0]
        return [round(b, 1) for b in res.pred_boxes.tensor[:, 0].tolist()]

    assert kept(None) == [20.0]  # top 2 = A, A'; NMS leaves A alone
    assert kept(3) == [20.0, 75.0]  # A, A', B -> A, B
    assert kept(4) == [20.0, 75.0]  # A, A', B, C -> A, B, C, capped at K = 2
    assert kept(4, thresh=None) == [20.0, 21.0]  # no NMS: the top K, as without candidates
    for bad in (1, "None", True):
        with pytest.raises(ValueError, match="test_topk_candidates"):
            FakeDETR(use_focal=True, k=2, test_topk_candidates=bad)


@pytest.mark.parametrize("method", ["detr", "conditional_detr", "dab_detr", "sd_detr"])
def test_single_scale_detrs_take_the_inference_nms_settings(tmp_path, method):
    """``model.test_nms_thresh`` / ``test_topk_candidates`` reach DETRBase from every single-scale
    meta-architecture's config: with NMS at 0.5 no two same-class detections overlap above it,
    where the same weights without NMS give such a pair (a duplicate planted in the outputs)."""
    from detectron2.config import LazyConfig, instantiate
    from torchvision.ops import box_iou

    from tiny_configs import random_image, write_tiny_config

    def build(extra=""):
        cfg = LazyConfig.load(write_tiny_config(tmp_path, method, extra=extra))
        torch.manual_seed(0)
        model = instantiate(cfg.model).eval()
        features = model.forward_features

        def with_a_duplicate(*args, **kwargs):  # query 1 := query 0, both the top class-0 scores
            out = features(*args, **kwargs)
            out["pred_logits"][:, 0, 0] += 20.0
            out["pred_logits"][:, 1] = out["pred_logits"][:, 0]
            out["pred_boxes"][:, 1] = out["pred_boxes"][:, 0]
            return out

        model.forward_features = with_a_duplicate
        return model

    def max_same_class_iou(inst):
        iou = box_iou(inst.pred_boxes.tensor, inst.pred_boxes.tensor)
        same = inst.pred_classes[:, None] == inst.pred_classes[None, :]
        return (iou * same).fill_diagonal_(0).max().item()

    plain = build()
    nms = build("model.test_nms_thresh = 0.5\nmodel.test_topk_candidates = 12\n")
    nms.load_state_dict(plain.state_dict())
    assert (nms.test_nms_thresh, nms.test_topk_candidates) == (0.5, 12)
    with torch.no_grad():
        batch = [{"image": random_image(96, 128, 0)}]
        before, after = plain(batch)[0]["instances"], nms(batch)[0]["instances"]
    assert max_same_class_iou(before) > 0.5
    assert max_same_class_iou(after) <= 0.5 + 1e-6 and 0 < len(after) <= 10
