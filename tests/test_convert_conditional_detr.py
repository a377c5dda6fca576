"""Hugging Face ConditionalDetrForObjectDetection -> d2detr ConditionalDETR: same outputs.

Randomly initialised transformers models (timm ResNets built without pretrained weights,
no download) are converted with ``d2detr.checkpoint``; our ConditionalDETR, built from
``projects/conditional_detr/configs/models/conditional_detr_r50.py`` with the converter's
overrides, must give the same class logits and boxes for every query (1e-4).
"""
import os
import re

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
    detect_model_type,
    get_converter,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_CFG = os.path.join(ROOT, "projects/conditional_detr/configs/models/conditional_detr_r50.py")
SMALL = dict(
    num_queries=9, encoder_layers=2, decoder_layers=2, d_model=64,
    encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=96, decoder_ffn_dim=96, num_labels=5,
)
TIMM_R18 = dict(use_timm_backbone=True, backbone="resnet18", use_pretrained_backbone=False)


def our_model(overrides):
    return build_model(MODEL_CFG, overrides).eval()


def compare(hf, ours, x, pixel_mask, atol=1e-4):
    return assert_hf_parity(hf, ours, x, pixel_mask, atol=atol, box_spread=slice(0, 2))


def hf_model(seed=0, **kwargs):
    from transformers import ConditionalDetrConfig, ConditionalDetrForObjectDetection

    torch.manual_seed(seed)
    cfg = ConditionalDetrConfig(**{**SMALL, **TIMM_R18, **kwargs})
    model = ConditionalDetrForObjectDetection(cfg).eval()
    randomize_hf_weights(model, seed)
    return model


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(backbone="resnet50", dilation=True, decoder_layers=3)],
    ids=["timm-r18", "timm-r50-dc5-3dec"],
)
def test_hf_conditional_detr_parity(kwargs):
    hf = hf_model(**kwargs)
    sd, overrides = convert_hf_checkpoint(hf.state_dict(), hf.config)
    assert overrides["model.num_classes"] == 5 and overrides["model.num_queries"] == 9
    assert overrides["model.backbone.depth"] == (50 if kwargs else 18)
    assert overrides["model.backbone.dc5"] == kwargs.get("dilation", False)
    ours = our_model(overrides)
    ours.load_state_dict(sd, strict=True)
    compare(hf, ours, *padded_hf_inputs())


def test_hub_layout_converts_too():
    """The transformers 4 key layout of the Hub checkpoints (sa_*/ca_* on the layer,
    conv_encoder, out_proj, fc1) gives the same model."""
    hf = hf_model(seed=2)
    sd_new = hf.state_dict()
    legacy = {}
    for k, v in sd_new.items():
        k = k.replace("model.backbone.", "model.backbone.conv_encoder.")
        k = re.sub(r"\.o_proj\.", ".out_proj.", k)
        k = re.sub(r"\.mlp\.fc([12])\.", r".fc\1.", k)
        k = re.sub(r"self_attn\.(q|k)_content_proj", r"sa_\1content_proj", k)
        k = re.sub(r"self_attn\.(q|k)_pos_proj", r"sa_\1pos_proj", k)
        k = re.sub(r"decoder\.layers\.(\d+)\.self_attn\.v_proj", r"decoder.layers.\1.sa_v_proj", k)
        k = re.sub(r"encoder_attn\.q_pos_sine_proj", "ca_qpos_sine_proj", k)
        k = re.sub(r"encoder_attn\.(q|k)_content_proj", r"ca_\1content_proj", k)
        k = re.sub(r"encoder_attn\.(q|k)_pos_proj", r"ca_\1pos_proj", k)
        k = re.sub(r"encoder_attn\.v_proj", "ca_v_proj", k)
        legacy[k] = v
    assert "model.decoder.layers.0.sa_qcontent_proj.weight" in legacy
    assert detect_model_type(legacy) == "conditional_detr"
    sd, overrides = convert_hf_checkpoint(legacy, {"encoder_attention_heads": 4})
    ours = our_model(overrides)
    ours.load_state_dict(sd, strict=True)
    compare(hf, ours, *padded_hf_inputs())


def test_convert_cli_roundtrip(tmp_path):
    hf = hf_model(seed=5)
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "cond.pth"
    stdout, ckpt = run_convert_checkpoint(tmp_path / "hf", out, MODEL_CFG)
    assert "conditional_detr" in stdout and "model.num_queries=9" in stdout
    ours = our_model(ckpt["overrides"])
    DetectionCheckpointer(ours).load(str(out))
    compare(hf, ours.eval(), *padded_hf_inputs())


def test_coco91_head_to_detectron2_contiguous():
    hf = hf_model(num_labels=91)
    cfg = hf.config.to_dict()
    cfg["id2label"] = {str(i): n for i, n in enumerate(["N/A", "person"] + [f"c{i}" for i in range(2, 91)])}
    sd80, overrides = convert_hf_checkpoint(hf.state_dict(), cfg)
    assert overrides["model.num_classes"] == 80
    w91 = hf.state_dict()["class_labels_classifier.weight"]
    assert sd80["class_embed.weight"].shape == (80, w91.shape[1])  # sigmoid head: no no-object row
    torch.testing.assert_close(sd80["class_embed.weight"], w91[coco91_to_contiguous_rows()])
    assert get_converter("conditional_detr").model_type == "conditional_detr"


def test_transformers_resnet_backbone_and_segmentation_prefix():
    """transformers' own ResNetBackbone converts, and a ConditionalDetrForSegmentation-style
    state dict (``conditional_detr.`` prefix, mask head) gives its detector."""
    from transformers import ResNetConfig

    bb = ResNetConfig(depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], layer_type="basic",
                      embedding_size=64, out_features=["stage4"])
    hf = hf_model(seed=3, use_timm_backbone=False, backbone=None, use_pretrained_backbone=None, backbone_config=bb)
    seg = {f"conditional_detr.{k}": v for k, v in hf.state_dict().items()}
    seg["mask_head.lay1.weight"] = torch.zeros(1)
    sd, overrides = convert_hf_checkpoint(seg, hf.config)
    assert overrides["model.backbone.depth"] == 18
    ours = our_model(overrides)
    ours.load_state_dict(sd, strict=True)
    compare(hf, ours, *padded_hf_inputs())
