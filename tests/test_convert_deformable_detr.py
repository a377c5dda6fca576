"""Parity with Hugging Face ``DeformableDetrForObjectDetection``.

Randomly initialised transformers models are built offline (timm ResNet-18 backbone, no
pretrained weights, the pure-PyTorch attention), converted with
``d2detr.checkpoint.hf_deformable_detr`` into the model our LazyConfig builds from the
converter's overrides, and our class logits and boxes for every query must match theirs to
1e-4 on the same image -- for plain, box-refinement and two-stage Deformable DETR, and for
single-scale.
"""
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")

from detectron2.config import LazyConfig, instantiate  # noqa: E402

from d2detr.checkpoint import apply_overrides, convert_hf_checkpoint, get_converter  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_CONFIG = os.path.join(REPO, "projects/deformable_detr/configs/models/deformable_detr_r50.py")
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def build_hf_model(seed=0, **kwargs):
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

    options = dict(
        use_timm_backbone=True,
        backbone="resnet18",
        use_pretrained_backbone=False,
        d_model=64,
        encoder_attention_heads=8,
        decoder_attention_heads=8,
        encoder_ffn_dim=96,
        decoder_ffn_dim=96,
        encoder_layers=2,
        decoder_layers=2,
        num_queries=12,
        two_stage_num_proposals=12,
        num_labels=5,
        disable_custom_kernels=True,
    )
    options.update(kwargs)
    torch.manual_seed(seed)
    model = DeformableDetrForObjectDetection(DeformableDetrConfig(**options))
    with torch.no_grad():
        for name, module in model.named_modules():
            if type(module).__name__.endswith("FrozenBatchNorm2d"):
                # random frozen statistics, so that a wrong BN mapping cannot go unnoticed
                n = module.weight.numel()
                module.weight.copy_(torch.rand(n) + 0.5)
                module.bias.copy_(torch.randn(n) * 0.1)
                module.running_mean.copy_(torch.randn(n) * 0.1)
                module.running_var.copy_(torch.rand(n) + 0.5)
        for name, p in model.named_parameters():
            if not name.startswith("model.backbone."):
                # the official init zeroes the offset / attention-weight projections and the
                # last box layer: perturb everything so every weight reaches the outputs
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def build_ours(overrides):
    cfg = LazyConfig.load(MODEL_CONFIG)
    apply_overrides(cfg, overrides)
    return instantiate(cfg.model).eval()


def test_converter_is_registered():
    assert get_converter("deformable_detr").model_type == "deformable_detr"


@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(with_box_refine=True),
        dict(with_box_refine=True, two_stage=True),
        dict(num_feature_levels=1),
    ],
    ids=["plain", "refine", "two_stage", "single_scale"],
)
def test_hf_parity(variant):
    hf = build_hf_model(**variant)
    state_dict, overrides = convert_hf_checkpoint(hf.state_dict(), hf.config, classes="keep")
    assert overrides["model.num_classes"] == 5
    ours = build_ours(overrides)
    assert set(ours.state_dict()) == set(state_dict)
    ours.load_state_dict(state_dict, strict=True)

    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 96, 128), generator=g).float()
    with torch.no_grad():
        theirs = hf(pixel_values=((image / 255 - IMAGENET_MEAN) / IMAGENET_STD)[None])
        images, masks = ours.preprocess_image([{"image": image}])
        mine = ours.forward_features(images, masks)
    assert mine["pred_logits"].shape == theirs.logits.shape
    torch.testing.assert_close(mine["pred_logits"], theirs.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(mine["pred_boxes"], theirs.pred_boxes, atol=1e-4, rtol=0)
    # not a vacuous comparison: the predictions differ from query to query
    assert theirs.pred_boxes[0].std(0).min() > 1e-3
    assert theirs.logits[0].std(0).min() > 1e-3


def test_hf_parity_with_padding():
    """Two images of different sizes in one padded batch: masks, valid ratios and the
    padding-aware proposals must agree with HF given the same pixel mask."""
    hf = build_hf_model(with_box_refine=True, two_stage=True)
    state_dict, overrides = convert_hf_checkpoint(hf.state_dict(), hf.config, classes="keep")
    ours = build_ours(overrides)
    ours.load_state_dict(state_dict, strict=True)
    g = torch.Generator().manual_seed(2)
    a = torch.randint(0, 256, (3, 96, 128), generator=g).float()
    b = torch.randint(0, 256, (3, 64, 96), generator=g).float()
    with torch.no_grad():
        images, masks = ours.preprocess_image([{"image": a}, {"image": b}])
        mine = ours.forward_features(images, masks)
        pixel_values = images.tensor  # our normalisation, zero-padded, as HF's processor pads
        theirs = hf(pixel_values=pixel_values, pixel_mask=(~masks).long())
    torch.testing.assert_close(mine["pred_logits"], theirs.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(mine["pred_boxes"], theirs.pred_boxes, atol=1e-4, rtol=0)


def test_coco80_class_rows():
    """91-way COCO heads become Detectron2's 80 classes; the two-stage proposal head keeps
    the logit it ranks by (row 0) first."""
    from d2detr.checkpoint import coco91_to_contiguous_rows

    hf = build_hf_model(with_box_refine=True, two_stage=True, num_labels=91, decoder_layers=1, encoder_layers=1)
    hf.config.id2label = {i: ("person" if i == 1 else f"c{i}") for i in range(91)}
    sd = hf.state_dict()
    converted, overrides = convert_hf_checkpoint(sd, hf.config)
    assert overrides["model.num_classes"] == 80
    rows = coco91_to_contiguous_rows()
    torch.testing.assert_close(converted["class_embed.0.weight"], sd["class_embed.0.weight"][rows])
    enc = converted["class_embed.1.weight"]  # the extra head of a 1-layer decoder
    assert enc.shape[0] == 80
    torch.testing.assert_close(enc[0], sd["class_embed.1.weight"][0])
    torch.testing.assert_close(enc[1:], sd["class_embed.1.weight"][rows[1:]])


@pytest.mark.parametrize("variant", [dict(), dict(with_box_refine=True, two_stage=True)], ids=["plain", "two_stage"])
def test_convert_checkpoint_tool(tmp_path, variant):
    """tools/convert_checkpoint.py on a folder written by ``save_pretrained`` (the Hub layout:
    ``conv_encoder`` backbone keys, tied heads saved once): detects the model type, converts,
    builds our config with the overrides, loads every tensor strictly and matches HF."""
    import importlib.util

    from detectron2.checkpoint import DetectionCheckpointer

    hf = build_hf_model(encoder_layers=1, **variant)
    hf.save_pretrained(tmp_path / "hf")
    spec = importlib.util.spec_from_file_location("convert_checkpoint", os.path.join(REPO, "tools/convert_checkpoint.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "ours.pth"
    tool.main([str(tmp_path / "hf"), str(out), "--config-file", MODEL_CONFIG])
    saved = torch.load(out, weights_only=False)
    assert saved["model_type"] == "deformable_detr"
    ours = build_ours(saved["overrides"])
    DetectionCheckpointer(ours).load(str(out))
    g = torch.Generator().manual_seed(3)
    image = torch.randint(0, 256, (3, 64, 96), generator=g).float()
    with torch.no_grad():
        theirs = hf(pixel_values=((image / 255 - IMAGENET_MEAN) / IMAGENET_STD)[None])
        mine = ours.forward_features(*ours.preprocess_image([{"image": image}]))
    torch.testing.assert_close(mine["pred_logits"], theirs.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(mine["pred_boxes"], theirs.pred_boxes, atol=1e-4, rtol=0)
