"""Hugging Face DetrForObjectDetection -> d2detr DETR: same outputs after conversion.

Randomly initialised transformers models (no download: timm / HF ResNet
backbones built without pretrained weights) are converted with
``d2detr.checkpoint``; our DETR, built from ``projects/detr/configs/models/detr_r50.py``
with the converter's overrides, must give the same class logits and boxes for
every query on the same normalised images (1e-4). Also: torchvision ImageNet
ResNets (backbone initialisation) and the official facebookresearch/detr layout.
"""
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402

from helpers import (  # noqa: E402
    assert_hf_parity, build_model, padded_hf_inputs, randomize_hf_weights, run_convert_checkpoint)

from d2detr.checkpoint import (  # noqa: E402
    coco91_to_contiguous_rows,
    convert_hf_checkpoint,
    get_converter,
    load_hf_checkpoint,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_CFG = os.path.join(ROOT, "projects/detr/configs/models/detr_r50.py")
SMALL = dict(
    num_queries=7, encoder_layers=2, decoder_layers=2, d_model=64,
    encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=96, decoder_ffn_dim=96, num_labels=5,
)


def _our_model(overrides):
    return build_model(MODEL_CFG, overrides).eval()


def _hf_model(seed=0, **kwargs):
    from transformers import DetrConfig, DetrForObjectDetection

    torch.manual_seed(seed)
    cfg = DetrConfig(**{**SMALL, **kwargs})
    model = DetrForObjectDetection(cfg).eval()
    randomize_hf_weights(model, seed, embedding_key="query_position")
    return model


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(use_timm_backbone=True, backbone="resnet18", use_pretrained_backbone=False),
        dict(use_timm_backbone=True, backbone="resnet50", use_pretrained_backbone=False, dilation=True),
    ],
    ids=["timm-r18", "timm-r50-dc5"],
)
def test_hf_detr_parity(kwargs):
    hf = _hf_model(**kwargs)
    sd, overrides = convert_hf_checkpoint(hf.state_dict(), hf.config)
    assert overrides["model.num_classes"] == 5 and overrides["model.num_queries"] == 7
    assert overrides["model.backbone.depth"] == (18 if kwargs["backbone"] == "resnet18" else 50)
    assert overrides["model.backbone.dc5"] == kwargs.get("dilation", False)
    ours = _our_model(overrides)
    ours.load_state_dict(sd, strict=True)
    x, pixel_mask = padded_hf_inputs()
    assert_hf_parity(hf, ours, x, pixel_mask)


def test_hf_detr_parity_transformers_resnet_backbone():
    """transformers' own ResNetBackbone (the "no_timm" checkpoints) converts as well."""
    from transformers import ResNetConfig

    bb = ResNetConfig(
        depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], layer_type="basic",
        embedding_size=64, out_features=["stage4"],
    )
    hf = _hf_model(use_timm_backbone=False, backbone_config=bb, seed=3)
    sd, overrides = convert_hf_checkpoint(hf.state_dict(), hf.config)
    assert overrides["model.backbone.depth"] == 18
    ours = _our_model(overrides)
    ours.load_state_dict(sd, strict=True)
    assert_hf_parity(hf, ours, *padded_hf_inputs())


def test_convert_cli_folder_roundtrip(tmp_path):
    """save_pretrained folder -> tools/convert_checkpoint.py -> .pth that
    DetectionCheckpointer loads into the model the overrides describe."""
    hf = _hf_model(use_timm_backbone=True, backbone="resnet18", use_pretrained_backbone=False, seed=5)
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "detr.pth"
    stdout, ckpt = run_convert_checkpoint(tmp_path / "hf", out, MODEL_CFG)
    assert "model.num_queries=7" in stdout
    assert set(ckpt) >= {"model", "__author__", "overrides"}
    ours = _our_model(ckpt["overrides"])
    incompatible = DetectionCheckpointer(ours).load(str(out))
    assert incompatible is not None
    assert_hf_parity(hf, ours.eval(), *padded_hf_inputs())


def test_single_file_without_config(tmp_path):
    """A bare weight file: the model type and the sizes are read off the tensors."""
    from safetensors.torch import save_file

    hf = _hf_model(use_timm_backbone=True, backbone="resnet18", use_pretrained_backbone=False, seed=7)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path))
    sd_in, cfg = load_hf_checkpoint(str(path))
    assert cfg is None
    # the number of heads is the one size the tensors do not tell
    sd, overrides = convert_hf_checkpoint(sd_in, {"encoder_attention_heads": 4})
    assert overrides["model.backbone.depth"] == 18
    assert overrides["model.transformer.num_encoder_layers"] == 2
    assert overrides["model.transformer.dim_feedforward"] == 96
    ours = _our_model(overrides)
    ours.load_state_dict(sd, strict=True)
    assert_hf_parity(hf, ours, *padded_hf_inputs())


def test_coco91_head_to_detectron2_contiguous():
    """91-way COCO heads (facebook/detr-*) keep the 80 thing rows in Detectron2's order."""
    hf = _hf_model(use_timm_backbone=True, backbone="resnet18", use_pretrained_backbone=False, num_labels=91)
    cfg = hf.config.to_dict()
    sd91, overrides91 = convert_hf_checkpoint(hf.state_dict(), cfg)  # LABEL_1 is no COCO head: kept
    assert overrides91["model.num_classes"] == 91 and sd91["class_embed.weight"].shape[0] == 92
    cfg["id2label"] = {str(i): n for i, n in enumerate(["N/A", "person"] + [f"c{i}" for i in range(2, 91)])}
    sd80, overrides = convert_hf_checkpoint(hf.state_dict(), cfg)  # auto -> coco80
    assert overrides["model.num_classes"] == 80
    rows = coco91_to_contiguous_rows()
    assert len(rows) == 80 and rows[0] == 1 and rows[-1] == 90
    w91, w80 = sd91["class_embed.weight"], sd80["class_embed.weight"]
    assert w80.shape == (81, w91.shape[1])
    torch.testing.assert_close(w80[:80], w91[rows])
    torch.testing.assert_close(w80[80], w91[91])  # no-object stays last
    with pytest.raises(ValueError):
        convert_hf_checkpoint(_hf_model(num_labels=5, use_timm_backbone=True, backbone="resnet18",
                                        use_pretrained_backbone=False).state_dict(), None, classes="coco80")


def test_registry_errors():
    assert get_converter("detr").model_type == "detr"
    with pytest.raises(KeyError):
        get_converter("not_a_model")
    with pytest.raises(KeyError):
        convert_hf_checkpoint({"foo": torch.zeros(1)}, {"model_type": "detr"})
    from d2detr.checkpoint.hf_detr import hf_detr_overrides

    # timm's resnet50d has a deep stem our ResNet does not have: refuse rather than mis-convert
    with pytest.raises(ValueError, match="plain ResNets"):
        hf_detr_overrides({"backbone_config": {"model_type": "timm_backbone", "backbone": "resnet50d"}})
    assert hf_detr_overrides({"backbone_config": {"backbone": "timm/resnet101.a1h_in1k"}})[
        "model.backbone.depth"] == 101


def _torchvision_resnet18(seed=0):
    import torchvision

    torch.manual_seed(seed)
    tv = torchvision.models.resnet18(weights=None).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return tv


def _tv_res5(tv, x):
    with torch.no_grad():
        x = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        return tv.layer4(tv.layer3(tv.layer2(tv.layer1(x))))


def test_torchvision_resnet_initialises_the_backbone(tmp_path):
    """An ImageNet torchvision ResNet .pth -> train.init_checkpoint for DETR's backbone."""
    tv = _torchvision_resnet18()
    src = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), src)
    sd, cfg = load_hf_checkpoint(str(src))
    state_dict, overrides = convert_hf_checkpoint(sd, cfg)
    assert overrides == {"model.backbone.depth": 18}
    assert all(k.startswith("backbone.") for k in state_dict)
    out = tmp_path / "r18.pth"
    from d2detr.checkpoint import save_checkpoint

    save_checkpoint(str(out), state_dict, overrides=overrides)
    ours = _our_model({**overrides, "model.num_classes": 3, "model.transformer.num_encoder_layers": 1,
                       "model.transformer.num_decoder_layers": 1})
    incompatible = DetectionCheckpointer(ours).load(str(out))
    assert incompatible is not None
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        res5 = ours.backbone(x)["res5"]
    torch.testing.assert_close(res5, _tv_res5(tv, x), atol=1e-4, rtol=1e-4)


def test_official_detr_checkpoint_layout():
    """facebookresearch/detr names (backbone.0.body.*, transformer.* as ours)."""
    tv = _torchvision_resnet18(seed=1)
    overrides = {"model.backbone.depth": 18, "model.num_classes": 91, "model.num_queries": 7,
                 "model.position_embedding.num_pos_feats": 32, "model.transformer.d_model": 64,
                 "model.transformer.num_encoder_layers": 2, "model.transformer.num_decoder_layers": 2,
                 "model.transformer.dim_feedforward": 96, "model.transformer.nhead": 4}
    reference = _our_model(overrides)
    official = {"backbone.0.body." + k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    official.update({k: v for k, v in reference.state_dict().items() if not k.startswith("backbone.")})
    sd, got = convert_hf_checkpoint({"model": official}["model"], None, classes="keep")
    assert got["model.backbone.depth"] == 18 and got["model.num_queries"] == 7
    assert got["model.transformer.num_decoder_layers"] == 2 and got["model.num_classes"] == 91
    ours = _our_model(overrides)
    ours.load_state_dict(sd, strict=True)
    for k, v in reference.state_dict().items():
        if not k.startswith("backbone."):
            assert torch.equal(sd[k], v), k
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours.backbone(x)["res5"], _tv_res5(tv, x), atol=1e-4, rtol=1e-4)
    sd80, got80 = convert_hf_checkpoint(official, None)  # auto: 91 COCO ids -> 80
    assert got80["model.num_classes"] == 80 and sd80["class_embed.weight"].shape[0] == 81
