"""Hugging Face DabDetrForObjectDetection -> d2detr DABDETR: same outputs.

Randomly initialised transformers DAB-DETR models (timm ResNets without pretrained weights,
no download) are converted with ``d2detr.checkpoint``; our DABDETR, built from
``projects/dab_detr/configs/models/dab_detr_r50.py`` with the converter's overrides, must give
the same class logits and boxes for every query (1e-4), patterns and DC5 included.
"""
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402

from helpers import (  # noqa: E402
    assert_hf_parity, build_model, padded_hf_inputs, randomize_hf_weights, run_convert_checkpoint)

from d2detr.checkpoint import convert_hf_checkpoint, detect_model_type  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_CFG = os.path.join(ROOT, "projects/dab_detr/configs/models/dab_detr_r50.py")
SMALL = dict(
    num_queries=9, encoder_layers=2, decoder_layers=2, hidden_size=64,
    encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=96, decoder_ffn_dim=96, num_labels=5,
)
TIMM_R18 = dict(use_timm_backbone=True, backbone="resnet18", use_pretrained_backbone=False)


def our_model(overrides):
    return build_model(MODEL_CFG, overrides).eval()


def compare(hf, ours, x, pixel_mask, atol=1e-4):
    return assert_hf_parity(hf, ours, x, pixel_mask, atol=atol, box_spread=slice(None))


def hf_model(seed=0, **kwargs):
    from transformers import DabDetrConfig, DabDetrForObjectDetection

    torch.manual_seed(seed)
    cfg = DabDetrConfig(**{**SMALL, **TIMM_R18, **kwargs})
    model = DabDetrForObjectDetection(cfg).eval()
    randomize_hf_weights(model, seed)
    with torch.no_grad():  # anchors: centres spread over the image, sizes 0.1..0.6
        ref = model.model.query_refpoint_embeddings.weight
        g = torch.Generator().manual_seed(seed + 1)
        xy = torch.rand(ref.shape[0], 2, generator=g) * 0.8 + 0.1
        wh = torch.rand(ref.shape[0], 2, generator=g) * 0.5 + 0.1
        ref.copy_(torch.logit(torch.cat([xy, wh], 1)))
    return model


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(num_patterns=3, keep_query_pos=True, decoder_layers=3),
     dict(backbone="resnet50", dilation=True)],
    ids=["timm-r18", "r18-3patterns-keep-query-pos-3dec", "timm-r50-dc5"],
)
def test_hf_dab_detr_parity(kwargs):
    hf = hf_model(**kwargs)
    sd, overrides = convert_hf_checkpoint(hf.state_dict(), hf.config)
    assert overrides["model.num_classes"] == 5 and overrides["model.num_queries"] == 9
    assert overrides["model.transformer.num_patterns"] == kwargs.get("num_patterns", 0)
    assert overrides["model.transformer.activation"] == "prelu"
    assert overrides["model.backbone.depth"] == (50 if "backbone" in kwargs else 18)
    assert overrides["model.backbone.dc5"] == kwargs.get("dilation", False)
    ours = our_model(overrides)
    ours.load_state_dict(sd, strict=True)
    assert ours.bbox_embed is ours.transformer.decoder.bbox_embed
    out = compare(hf, ours, *padded_hf_inputs())
    assert out["pred_logits"].shape[1] == 9 * max(kwargs.get("num_patterns", 0), 1)


def test_single_file_without_config(tmp_path):
    """A bare state dict: model type, sizes, patterns and PReLU are read off the tensors."""
    hf = hf_model(seed=3, num_patterns=2)
    assert detect_model_type(hf.state_dict()) == "dab-detr"
    sd, overrides = convert_hf_checkpoint(hf.state_dict(), {"encoder_attention_heads": 4})
    assert overrides["model.transformer.num_patterns"] == 2
    ours = our_model(overrides)
    ours.load_state_dict(sd, strict=True)
    compare(hf, ours, *padded_hf_inputs())


def test_convert_cli_roundtrip(tmp_path):
    hf = hf_model(seed=5)
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "dab.pth"
    stdout, ckpt = run_convert_checkpoint(tmp_path / "hf", out, MODEL_CFG)
    assert "dab-detr" in stdout and "model.num_queries=9" in stdout
    ours = our_model(ckpt["overrides"])
    DetectionCheckpointer(ours).load(str(out))
    compare(hf, ours.eval(), *padded_hf_inputs())
