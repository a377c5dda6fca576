import torch
import torchvision

from d2detr.layers import (
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    inverse_sigmoid,
)


def _random_xyxy(n, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 50
    wh = torch.rand(n, 2, generator=g) * 40 + 0.5
    return torch.cat([xy, xy + wh], dim=1)


def test_conversions_round_trip():
    b = _random_xyxy(17, 0)
    torch.testing.assert_close(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(b)), b)
    c = box_xyxy_to_cxcywh(b)
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(c)), c)
    # arbitrary leading dims
    c3 = c.view(1, 17, 4).expand(3, 17, 4)
    assert box_cxcywh_to_xyxy(c3).shape == (3, 17, 4)
    # known value
    x = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    torch.testing.assert_close(box_cxcywh_to_xyxy(x), torch.tensor([[0.4, 0.3, 0.6, 0.7]]))


def test_iou_and_giou_match_torchvision():
    a, b = _random_xyxy(9, 1), _random_xyxy(7, 2)
    iou, union = box_iou(a, b)
    torch.testing.assert_close(iou, torchvision.ops.box_iou(a, b))
    torch.testing.assert_close(generalized_box_iou(a, b), torchvision.ops.generalized_box_iou(a, b))
    # identical boxes -> 1, far apart -> negative
    torch.testing.assert_close(generalized_box_iou(a, a).diagonal(), torch.ones(9))
    far = torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[9.0, 9.0, 10.0, 10.0]])
    assert generalized_box_iou(*far).item() < -0.9


def test_inverse_sigmoid():
    x = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(inverse_sigmoid(x).sigmoid(), x)
    # clamped at eps=1e-5 (official Deformable DETR), finite at 0 and 1
    ends = inverse_sigmoid(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(ends, torch.tensor([-1.0, 1.0]) * torch.log(torch.tensor(1 / 1e-5)))
    assert inverse_sigmoid(torch.tensor([0.0]), eps=1e-3).item() > -7.0
