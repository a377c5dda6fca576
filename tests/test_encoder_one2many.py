"""The one-to-many encoder loss (``SetCriterion(enc_one2many_repeat=K)``): DINO's transformer hands
every encoder token's proposal to the criterion in training, and each object supervises its K
cheapest tokens (Hungarian on the targets repeated K times), not only the selected queries."""
import math

import pytest
import torch
from detectron2.config import LazyConfig, instantiate

from d2detr.layers import native_ms_deform_attn_available
from d2detr.modeling.criterion import SetCriterion
from d2detr.modeling.matcher import HungarianMatcher
from helpers import synthetic_batch
from tiny_configs import write_tiny_config

WEIGHTS = {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}


def _criterion(repeat: int) -> SetCriterion:
    return SetCriterion(1, HungarianMatcher(2.0, 5.0, 2.0, use_focal=True), WEIGHTS, use_focal=True,
                        enc_one2many_repeat=repeat)


def test_each_object_supervises_its_k_nearest_tokens():
    """Five tokens with equal scores, two of them close to the one object: with K = 2 exactly those
    two are positives. The losses are written out by hand (focal at p = 0.5, L1 and GIoU of the
    two boxes) and normalised by K boxes."""
    target = torch.tensor([0.5, 0.5, 0.2, 0.2])
    near = torch.tensor([[0.52, 0.5, 0.2, 0.2], [0.5, 0.47, 0.2, 0.22]])
    far = torch.tensor([[0.1, 0.1, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1], [0.1, 0.9, 0.1, 0.1]])
    dense = {"pred_logits": torch.zeros(1, 5, 1), "pred_boxes": torch.cat([far[:1], near[:1], far[1:], near[1:]])[None]}
    targets = [{"labels": torch.tensor([0]), "boxes": target[None]}]
    outputs = {"pred_logits": torch.zeros(1, 3, 1), "pred_boxes": torch.full((1, 3, 4), 0.5),
               "enc_dense_outputs": dense}
    losses = _criterion(2)(outputs, targets)
    log2 = math.log(2.0)
    positive, negative = 0.25 * 0.5**2 * log2, 0.75 * 0.5**2 * log2  # alpha (1-p)^2 (-log p) and its negative
    assert losses["loss_class_enc_one2many"].item() == pytest.approx((2 * positive + 3 * negative) / 2, rel=1e-5)
    l1 = (near - target).abs().sum().item()
    assert losses["loss_bbox_enc_one2many"].item() == pytest.approx(5.0 * l1 / 2, rel=1e-5)

    def giou_with_target(box):  # box given as cxcywh; the target spans 0.4..0.6 on both axes
        ax0, ay0, ax1, ay1 = box[0] - box[2] / 2, box[1] - box[3] / 2, box[0] + box[2] / 2, box[1] + box[3] / 2
        bx0, by0, bx1, by1 = 0.4, 0.4, 0.6, 0.6
        inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
        union = box[2] * box[3] + 0.04 - inter
        hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
        return inter / union - (hull - union) / hull

    giou = sum(1 - giou_with_target(b.tolist()) for b in near)
    assert losses["loss_giou_enc_one2many"].item() == pytest.approx(2.0 * giou / 2, rel=1e-4)


def test_missing_dense_outputs_and_a_negative_repeat_are_refused():
    outputs = {"pred_logits": torch.zeros(1, 3, 1), "pred_boxes": torch.full((1, 3, 4), 0.5)}
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    with pytest.raises(ValueError, match="enc_dense_outputs"):
        _criterion(2)(outputs, targets)
    assert not any(k.endswith("_enc_one2many") for k in _criterion(0)(outputs, targets))
    with pytest.raises(ValueError, match="enc_one2many_repeat must be >= 0"):
        _criterion(-1)


@pytest.mark.skipif(not native_ms_deform_attn_available("cpu"), reason="d2detr._C not built")
def test_dino_gives_every_token_in_training_and_the_selection_is_part_of_it(tmp_path):
    """DINO in training returns one proposal per encoder token (the sum of the levels' H x W), the
    selected encoder outputs are rows of it, the one-to-many losses reach the proposal heads and
    leave the other losses as they were; inference gives none of it."""
    cfg = LazyConfig.load(write_tiny_config(tmp_path, "dino"))
    cfg.model.criterion.enc_one2many_repeat = 3
    torch.manual_seed(0)
    model = instantiate(cfg.model).train()
    batch = synthetic_batch(2, 64)
    images, masks = model.preprocess_image(batch)
    targets = model.prepare_targets([x["instances"] for x in batch])
    torch.manual_seed(1)
    out = model.forward_features(images, masks, targets=targets)
    dense = out["enc_dense_outputs"]
    srcs, _, _ = model.multi_scale_features(images, masks)
    assert dense["pred_logits"].shape[:2] == (2, sum(s.shape[-2] * s.shape[-1] for s in srcs))
    assert dense["pred_boxes"].shape == (*dense["pred_logits"].shape[:2], 4)
    selected = out["enc_outputs"]["pred_logits"]
    for i in range(2):  # every selected logit row is one of the dense rows
        rows = dense["pred_logits"][i]
        assert all((rows == row).all(-1).any() for row in selected[i])
    losses = model.criterion(out, targets)
    model.criterion.enc_one2many_repeat = 0
    plain = model.criterion(out, targets)
    assert sorted(set(losses) - set(plain)) == ["loss_bbox_enc_one2many", "loss_class_enc_one2many",
                                                "loss_giou_enc_one2many"]
    for k, v in plain.items():
        torch.testing.assert_close(losses[k], v)
    losses["loss_class_enc_one2many"].backward()
    class_head, _ = model.transformer.proposal_heads()
    assert class_head.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        images, masks = model.preprocess_image(batch)
        assert "enc_dense_outputs" not in model.forward_features(images, masks)
