import itertools

import pytest
import torch

from d2detr.layers import box_cxcywh_to_xyxy, generalized_box_iou
from d2detr.modeling.matcher import HungarianMatcher


def _random_problem(bs, nq, sizes, num_classes, seed, softmax):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(bs, nq, num_classes + (1 if softmax else 0), generator=g)
    boxes = torch.rand(bs, nq, 2, generator=g) * 0.6 + 0.2
    boxes = torch.cat([boxes, torch.rand(bs, nq, 2, generator=g) * 0.3 + 0.05], -1)
    targets = []
    for n in sizes:
        c = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        targets.append({"labels": torch.randint(num_classes, (n,), generator=g), "boxes": torch.cat([c, wh], -1)})
    return {"pred_logits": logits, "pred_boxes": boxes}, targets


def _cost(m, logits, boxes, labels, tboxes):
    """Per-pair cost written out directly from the papers' definitions."""
    if m.use_focal:
        p = logits.sigmoid()[labels]
        cls = m.alpha * (1 - p) ** m.gamma * -torch.log(p + 1e-8) - (1 - m.alpha) * p**m.gamma * -torch.log(
            1 - p + 1e-8
        )
    else:
        cls = -logits.softmax(-1)[labels]
    l1 = (boxes - tboxes).abs().sum()
    giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes[None]), box_cxcywh_to_xyxy(tboxes[None]))[0, 0]
    return m.cost_class * cls + m.cost_bbox * l1 - m.cost_giou * giou


def _brute_force(m, logits, boxes, tgt):
    n, nq = len(tgt["labels"]), logits.shape[0]
    best, best_cost = None, float("inf")
    if n <= nq:
        for perm in itertools.permutations(range(nq), n):  # target j -> query perm[j]
            c = sum(_cost(m, logits[q], boxes[q], tgt["labels"][j], tgt["boxes"][j]) for j, q in enumerate(perm))
            if c < best_cost:
                best, best_cost = perm, float(c)
        return best_cost, {(q, j) for j, q in enumerate(best)}
    for perm in itertools.permutations(range(n), nq):  # query i -> target perm[i]
        c = sum(_cost(m, logits[q], boxes[q], tgt["labels"][j], tgt["boxes"][j]) for q, j in enumerate(perm))
        if c < best_cost:
            best, best_cost = perm, float(c)
    return best_cost, {(q, j) for q, j in enumerate(best)}


@pytest.mark.parametrize("use_focal", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force(use_focal, seed):
    m = HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2, use_focal=use_focal)
    sizes = [3, 5, 0, 1]  # fewer targets than queries, as many+ (5 > 4), none, one
    outputs, targets = _random_problem(4, 4, sizes, num_classes=3, seed=seed, softmax=not use_focal)
    indices = m(outputs, targets)
    assert len(indices) == 4
    for b, (i, j) in enumerate(indices):
        assert i.dtype == j.dtype == torch.int64
        assert len(i) == len(j) == min(4, sizes[b])
        if sizes[b] == 0:
            continue
        ours = sum(
            float(_cost(m, outputs["pred_logits"][b, q], outputs["pred_boxes"][b, q], targets[b]["labels"][t], targets[b]["boxes"][t]))
            for q, t in zip(i.tolist(), j.tolist())
        )
        best_cost, _ = _brute_force(m, outputs["pred_logits"][b], outputs["pred_boxes"][b], targets[b])
        assert ours == pytest.approx(best_cost, abs=1e-4)


def test_zero_targets_everywhere():
    m = HungarianMatcher()
    outputs, targets = _random_problem(2, 5, [0, 0], 3, 0, softmax=True)
    for i, j in m(outputs, targets):
        assert i.numel() == 0 and j.numel() == 0 and i.dtype == torch.int64


def test_perfect_prediction_is_found():
    m = HungarianMatcher()
    outputs, targets = _random_problem(1, 6, [3], 4, 5, softmax=True)
    perm = torch.tensor([4, 0, 2])
    outputs["pred_boxes"][0, perm] = targets[0]["boxes"]
    outputs["pred_logits"][0, perm] = -10.0
    outputs["pred_logits"][0, perm, targets[0]["labels"]] = 10.0
    i, j = m(outputs, targets)[0]
    assert dict(zip(j.tolist(), i.tolist())) == {0: 4, 1: 0, 2: 2}
