import math

import pytest
import torch
import torchvision

from d2detr.modeling.criterion import SetCriterion
from d2detr.modeling.losses import sigmoid_focal_loss
from d2detr.modeling.matcher import HungarianMatcher

W = {"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 3.0}


def _box_xyxy(b):
    cx, cy, w, h = b.tolist()
    return torch.tensor([[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]])


def _tiny(num_logits):
    # one image, 2 queries, 1 target of class 1; query 0 is clearly the match
    logits = torch.tensor([[[0.2, 2.0, -1.0, 0.5][:num_logits], [0.3, -0.4, 1.5, 0.1][:num_logits]]])
    boxes = torch.tensor([[[0.50, 0.50, 0.20, 0.30], [0.10, 0.85, 0.05, 0.05]]])
    tgt = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.45, 0.55, 0.25, 0.20]])}]
    return {"pred_logits": logits, "pred_boxes": boxes}, tgt


def _box_refs(outputs, tgt):
    p, t = outputs["pred_boxes"][0, 0], tgt[0]["boxes"][0]
    l1 = (p - t).abs().sum()
    giou = torchvision.ops.generalized_box_iou(_box_xyxy(p), _box_xyxy(t))[0, 0]
    return l1, 1 - giou


def test_softmax_losses_hand_computed():
    outputs, tgt = _tiny(3)  # 2 classes + no-object
    crit = SetCriterion(2, HungarianMatcher(), W, eos_coef=0.1)
    losses = crit(outputs, tgt)
    assert set(losses) == {"loss_class", "loss_bbox", "loss_giou"}
    lg = outputs["pred_logits"][0]
    ce0 = -torch.log_softmax(lg[0], -1)[1]  # query 0 -> class 1
    ce1 = -torch.log_softmax(lg[1], -1)[2]  # query 1 -> no-object, weight 0.1
    ref_cls = (ce0 + 0.1 * ce1) / 1.1
    l1, giou = _box_refs(outputs, tgt)
    torch.testing.assert_close(losses["loss_class"], 2.0 * ref_cls)
    torch.testing.assert_close(losses["loss_bbox"], 5.0 * l1)
    torch.testing.assert_close(losses["loss_giou"], 3.0 * giou)


def test_focal_losses_hand_computed():
    outputs, tgt = _tiny(2)  # 2 classes, sigmoid
    matcher = HungarianMatcher(cost_class=2, use_focal=True)
    crit = SetCriterion(2, matcher, W, use_focal=True, focal_alpha=0.25, focal_gamma=2.0)
    losses = crit(outputs, tgt)
    onehot = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    ref = torchvision.ops.sigmoid_focal_loss(outputs["pred_logits"], onehot, 0.25, 2.0, reduction="sum") / 1
    torch.testing.assert_close(losses["loss_class"], 2.0 * ref)
    # closed form for one element: alpha (1-p)^2 (-log p)
    p = torch.sigmoid(torch.tensor(2.0))
    neg = sum(0.75 * torch.sigmoid(torch.tensor(x)) ** 2 * -torch.log(1 - torch.sigmoid(torch.tensor(x))) for x in (0.2, 0.3, -0.4))
    torch.testing.assert_close(losses["loss_class"], 2.0 * (0.25 * (1 - p) ** 2 * -torch.log(p) + neg))
    l1, giou = _box_refs(outputs, tgt)
    torch.testing.assert_close(losses["loss_bbox"], 5.0 * l1)


def test_sigmoid_focal_loss_equals_torchvision_incl_soft_targets():
    x = torch.randn(3, 7, 5)
    for t in (torch.randint(0, 2, (3, 7, 5)).float(), torch.rand(3, 7, 5)):
        for red in ("none", "sum", "mean"):
            torch.testing.assert_close(
                sigmoid_focal_loss(x, t, 0.25, 2.0, red),
                torchvision.ops.sigmoid_focal_loss(x, t, 0.25, 2.0, reduction=red),
            )


def test_aux_and_enc_keys_and_weights():
    outputs, tgt = _tiny(2)
    aux = [{k: v.clone() for k, v in outputs.items()} for _ in range(2)]
    enc = {"pred_logits": outputs["pred_logits"][..., :1].clone(), "pred_boxes": outputs["pred_boxes"].clone()}
    weights = dict(W, loss_class_enc=7.0)
    crit = SetCriterion(2, HungarianMatcher(use_focal=True), weights, use_focal=True)
    losses = crit(dict(outputs, aux_outputs=aux, enc_outputs=enc), tgt)
    names = {"loss_class", "loss_bbox", "loss_giou"}
    expected = names | {n + s for n in names for s in ("_0", "_1", "_enc")}
    assert set(losses) == expected
    for k in names:  # aux outputs identical to the final ones -> same weighted losses
        torch.testing.assert_close(losses[k + "_0"], losses[k])
        torch.testing.assert_close(losses[k + "_1"], losses[k])
    # enc: class-agnostic target (label 0) on a single logit, with its own weight 7
    onehot = torch.tensor([[[1.0], [0.0]]])
    ref = torchvision.ops.sigmoid_focal_loss(enc["pred_logits"], onehot, 0.25, 2.0, reduction="sum")
    torch.testing.assert_close(losses["loss_class_enc"], 7.0 * ref)
    torch.testing.assert_close(losses["loss_bbox_enc"], losses["loss_bbox"])


def test_missing_weight_is_an_error():
    outputs, tgt = _tiny(3)
    crit = SetCriterion(2, HungarianMatcher(), {"loss_class": 1.0, "loss_bbox": 1.0})
    with pytest.raises(KeyError, match="loss_giou"):
        crit(outputs, tgt)


@pytest.mark.parametrize("use_focal", [False, True])
def test_zero_target_images_are_finite_and_differentiable(use_focal):
    torch.manual_seed(0)
    K = 3 if use_focal else 4
    logits = torch.randn(2, 5, K, requires_grad=True)
    boxes = torch.rand(2, 5, 4).mul(0.3).add(0.2).requires_grad_()
    crit = SetCriterion(3, HungarianMatcher(use_focal=use_focal), W, use_focal=use_focal)
    empty = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    one = {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    for targets in ([empty, one], [empty, empty]):
        aux = [{"pred_logits": logits * 1.0, "pred_boxes": boxes * 1.0}]
        losses = crit({"pred_logits": logits, "pred_boxes": boxes, "aux_outputs": aux}, targets)
        total = sum(losses.values())
        assert all(torch.isfinite(v) for v in losses.values()), losses
        total.backward()
        assert torch.isfinite(logits.grad).all() and torch.isfinite(boxes.grad).all()
        logits.grad = boxes.grad = None
    # all-empty batch: box losses are exactly 0, num_boxes clamped to 1 (focal sums over all)
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    if use_focal:
        ref = torchvision.ops.sigmoid_focal_loss(logits, torch.zeros_like(logits), reduction="sum")
        torch.testing.assert_close(losses["loss_class"], 2.0 * ref)


def test_varifocal_class_loss_hand_computed():
    """IoU-aware classification (VarifocalNet / RT-DETR's VFL): the matched query's target is the
    IoU of its box with the target box, computed here with torchvision; negatives keep the
    focal down-weighting alpha * p**gamma; positives are weighted by the IoU."""
    outputs, tgt = _tiny(2)
    matcher = HungarianMatcher(cost_class=2, use_focal=True)
    crit = SetCriterion(2, matcher, W, use_focal=True, class_loss="varifocal", varifocal_alpha=0.75)
    losses = crit(outputs, tgt)
    iou = torchvision.ops.box_iou(_box_xyxy(outputs["pred_boxes"][0, 0]), _box_xyxy(tgt[0]["boxes"][0]))[0, 0]
    assert 0.2 < iou < 0.9  # a partial overlap, so the target is really soft

    def bce(x, t):
        x = torch.tensor(x)
        return -(t * torch.log(torch.sigmoid(x)) + (1 - t) * torch.log(1 - torch.sigmoid(x)))

    pos = iou * bce(2.0, iou)  # query 0, class 1
    neg = sum(0.75 * torch.sigmoid(torch.tensor(x)) ** 2 * bce(x, 0.0) for x in (0.2, 0.3, -0.4))
    torch.testing.assert_close(losses["loss_class"], 2.0 * (pos + neg))
    # the box losses are unchanged by the class loss
    focal = SetCriterion(2, matcher, W, use_focal=True)(outputs, tgt)
    torch.testing.assert_close(losses["loss_bbox"], focal["loss_bbox"])
    # gradients reach the logits only (the IoU target is detached)
    logits = outputs["pred_logits"].clone().requires_grad_()
    boxes = outputs["pred_boxes"].clone().requires_grad_()
    crit({"pred_logits": logits, "pred_boxes": boxes}, tgt)["loss_class"].backward()
    assert logits.grad.abs().sum() > 0 and boxes.grad is None


def test_varifocal_is_refused_without_sigmoid_classification_and_for_unknown_names():
    with pytest.raises(ValueError, match="use_focal"):
        SetCriterion(2, HungarianMatcher(), W, class_loss="varifocal")
    with pytest.raises(ValueError, match="class_loss"):
        SetCriterion(2, HungarianMatcher(), W, use_focal=True, class_loss="vfl")
    from d2detr.modeling.losses import varifocal_loss

    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        varifocal_loss(torch.zeros(2, 3), torch.full((2, 3), 1.5))


def test_varifocal_on_zero_target_images_is_finite():
    outputs, _ = _tiny(2)
    crit = SetCriterion(2, HungarianMatcher(cost_class=2, use_focal=True), W, use_focal=True, class_loss="varifocal")
    losses = crit(outputs, [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox"] == 0
