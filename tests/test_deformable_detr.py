"""Deformable DETR: configs, parameter counts, training losses, overfitting, inference I/O,
and the shared deformable transformer pieces. All on the CPU with tiny models."""
import math
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes, Instances

from helpers import assert_overfits

from d2detr.modeling.deformable_transformer import (
    DeformableTransformerDecoder,
    DeformableTransformerDecoderLayer,
    DeformableTransformerEncoder,
    gen_encoder_output_proposals,
    get_valid_ratio,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "projects/deformable_detr/configs")
MODEL_CONFIGS = [
    "models/deformable_detr_r50.py",
    "models/deformable_detr_single_scale_r50.py",
    "models/deformable_detr_refine_r50.py",
    "models/deformable_detr_two_stage_r50.py",
    "models/deformable_detr_mobilenetv2.py",
]
TRAIN_CONFIGS = [
    "deformable_detr_r50_50ep.py",
    "deformable_detr_single_scale_r50_50ep.py",
    "deformable_detr_refine_r50_50ep.py",
    "deformable_detr_two_stage_r50_50ep.py",
]


def tiny_model(variant="plain", num_classes=3, num_levels=4, dec_layers=2):
    """ResNet-18, width 64, 1 encoder / ``dec_layers`` decoder layers, 10 queries."""
    name = {
        "plain": "deformable_detr_r50",
        "refine": "deformable_detr_refine_r50",
        "two_stage": "deformable_detr_two_stage_r50",
        "single_scale": "deformable_detr_single_scale_r50",
    }[variant]
    cfg = LazyConfig.load(os.path.join(CONFIGS, "models", name + ".py"))
    m = cfg.model
    m.backbone.depth = 18
    for f, c in zip(("res3", "res4", "res5"), (128, 256, 512)):
        if f in m.neck.input_shapes:
            m.neck.input_shapes[f].channels = c
    m.neck.out_channels = m.embed_dim = m.transformer.embed_dim = 64
    m.position_embedding.num_pos_feats = 32
    m.num_classes = num_classes
    m.num_queries = 10
    m.transformer.encoder.num_layers = 1
    m.transformer.decoder.num_layers = dec_layers
    for layer in (m.transformer.encoder.encoder_layer, m.transformer.decoder.decoder_layer):
        layer.embed_dim = 64
        layer.ffn_dim = 128
    return instantiate(m)


def synthetic_inputs(num_classes=3):
    """Two images with coloured rectangles; boxes in XYXY pixels."""
    data = []
    specs = [((64, 80), [[8, 10, 40, 50], [44, 20, 76, 60]], [0, 2]), ((56, 72), [[20, 8, 60, 40]], [1])]
    for (h, w), boxes, classes in specs:
        img = torch.full((3, h, w), 30.0)
        for (x0, y0, x1, y1), c in zip(boxes, classes):
            img[c % 3, y0:y1, x0:x1] = 220.0
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.gt_classes = torch.tensor(classes, dtype=torch.long)
        data.append({"image": img, "instances": inst, "height": h, "width": w})
    return data


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("path", MODEL_CONFIGS)
def test_model_configs_instantiate(path):
    cfg = LazyConfig.load(os.path.join(CONFIGS, path))
    if "mobilenet" in path:
        cfg.model.backbone.pretrained = False  # the weights package is optional here
    model = instantiate(cfg.model)
    assert model.transformer.num_feature_levels == model.neck.num_outs


@pytest.mark.parametrize("path", TRAIN_CONFIGS)
def test_train_configs(path):
    cfg = LazyConfig.load(os.path.join(CONFIGS, path))
    for key in ("model", "dataloader", "optimizer", "lr_multiplier", "train"):
        assert key in cfg, key
    assert cfg.optimizer.lr == pytest.approx(2e-4)
    assert cfg.optimizer.weight_decay == pytest.approx(1e-4)
    assert cfg.train.clip_grad.enabled and cfg.train.clip_grad.params.max_norm == pytest.approx(0.1)
    factors = instantiate(cfg.optimizer.params.lr_factor_func)
    assert factors("backbone.res3.0.conv1.weight") == pytest.approx(0.1)
    assert factors("transformer.encoder.layers.0.self_attn.sampling_offsets.weight") == pytest.approx(0.1)
    assert factors("transformer.reference_points.weight") == pytest.approx(0.1)
    assert factors("transformer.encoder.layers.0.self_attn.value_proj.weight") == 1.0
    # 50 epochs at batch 32, lr x0.1 after epoch 40
    sched = cfg.lr_multiplier
    assert sched.milestones[0] / sched.num_updates == pytest.approx(0.8, abs=1e-3)
    assert cfg.train.max_iter == sched.num_updates


# (all parameters, trainable ones) at 91 classes. The official code prints the trainable count:
# 39,847,265 for Deformable DETR R50; the frozen stem + res2 hold the other 222,400.
# transformers' DeformableDetrForObjectDetection (timm ResNet-50) has the same totals, except
# with box refinement, where it ties the class heads of all decoder layers (the official code
# deep-copies them, as we do: 5 x 23,387 more).
PARAMS = {
    "deformable_detr_r50": (40_069_665, 39_847_265),
    "deformable_detr_single_scale_r50": (34_066_593, 33_844_193),
    "deformable_detr_refine_r50": (40_849_660, 40_627_260),
    "deformable_detr_two_stage_r50": (41_181_529, 40_959_129),
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_count(name):
    cfg = LazyConfig.load(os.path.join(CONFIGS, "models", name + ".py"))
    cfg.model.num_classes = 91
    model = instantiate(cfg.model)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{name}: {total:,} parameters, {trainable:,} trainable")
    assert (total, trainable) == PARAMS[name]


# ---------------------------------------------------------------------------- training
@pytest.mark.parametrize("variant", ["plain", "refine", "two_stage", "single_scale"])
def test_training_step_losses(variant):
    torch.manual_seed(0)
    model = tiny_model(variant, dec_layers=3).train()
    losses = model(synthetic_inputs())
    base = {"loss_class", "loss_bbox", "loss_giou"}
    expected = set(base)
    expected |= {f"{k}_{i}" for k in base for i in range(2)}  # aux: the first 2 of 3 decoder layers
    if variant == "two_stage":
        expected |= {k + "_enc" for k in base}
    assert set(losses) == expected
    for k, v in losses.items():
        assert v.dim() == 0 and torch.isfinite(v), k
    # weighted: focal x2, L1 x5, GIoU x2 -> the GIoU terms lie in (0, 2 * 2]
    assert 0 < losses["loss_giou"] <= 4
    sum(losses.values()).backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # the frozen stem and res2 get no gradient
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("backbone.stem."))


@pytest.mark.parametrize("variant", ["plain", "two_stage"])
def test_overfit_two_images(variant):
    """30 AdamW steps on two images at least halve the total loss (backbone frozen for speed)."""
    torch.manual_seed(0)
    model = tiny_model(variant, dec_layers=2).train()
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    assert_overfits(model, synthetic_inputs(), steps=30)


def test_inference_original_coordinates():
    torch.manual_seed(0)
    model = tiny_model("refine").eval()
    data = synthetic_inputs()
    with torch.no_grad():
        small = model([{"image": d["image"]} for d in data])
        big = model([{"image": d["image"], "height": 2 * d["height"], "width": 3 * d["width"]} for d in data])
    for s, b, d in zip(small, big, data):
        si, bi = s["instances"], b["instances"]
        assert len(si) == 10 * 3  # top-100 capped at queries x classes
        assert bi.image_size == (2 * d["height"], 3 * d["width"])
        scale = torch.tensor([3.0, 2.0, 3.0, 2.0])
        torch.testing.assert_close(bi.pred_boxes.tensor, si.pred_boxes.tensor * scale, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(bi.scores, si.scores)
        assert (si.scores[:-1] >= si.scores[1:]).all() and ((si.scores >= 0) & (si.scores <= 1)).all()
        assert si.pred_classes.max() < 3


def test_inference_matches_outputs():
    """Scores are the sigmoid of the best query x class logits; boxes the matching queries'."""
    torch.manual_seed(0)
    model = tiny_model("plain").eval()
    x = synthetic_inputs()[:1]
    with torch.no_grad():
        images, masks = model.preprocess_image(x)
        out = model.forward_features(images, masks)
        inst = model(x)[0]["instances"]
    prob = out["pred_logits"][0].sigmoid()
    top = prob.flatten().topk(5).values
    torch.testing.assert_close(inst.scores[:5], top)
    q = int(prob.flatten().argmax()) // prob.shape[1]
    cx, cy, w, h = out["pred_boxes"][0, q].tolist()
    H, W = x[0]["height"], x[0]["width"]
    expected = torch.tensor([(cx - w / 2) * W, (cy - h / 2) * H, (cx + w / 2) * W, (cy + h / 2) * H])
    torch.testing.assert_close(inst.pred_boxes.tensor[0], expected, rtol=1e-5, atol=1e-4)


def test_two_stage_requires_refine():
    cfg = LazyConfig.load(os.path.join(CONFIGS, "models/deformable_detr_two_stage_r50.py"))
    cfg.model.with_box_refine = False
    cfg.model.backbone.depth = 18
    with pytest.raises(ValueError, match="with_box_refine"):
        instantiate(cfg.model)


def test_heads_shared_or_separate():
    plain, refine = tiny_model("plain"), tiny_model("refine")
    assert plain.class_embed[0] is plain.class_embed[1] and plain.transformer.decoder.bbox_embed is None
    assert refine.class_embed[0] is not refine.class_embed[1]
    assert refine.transformer.decoder.bbox_embed is refine.bbox_embed
    # the official init: prior 0.01 class bias, zero last box layer, bias[2:] = -2 on the first head
    b = plain.class_embed[0].bias
    torch.testing.assert_close(b, torch.full_like(b, -math.log(99)))
    last = refine.bbox_embed[0].layers[-1]
    assert last.weight.abs().sum() == 0 and last.bias[2:].eq(-2).all()
    assert refine.bbox_embed[1].layers[-1].bias.abs().sum() == 0


# ---------------------------------------------------------------- shared transformer pieces
def test_valid_ratio_and_encoder_reference_points():
    mask = torch.zeros(2, 4, 6, dtype=torch.bool)
    mask[1, 2:, :] = True  # second image: 2 of 4 rows valid, 3 of 6 columns
    mask[1, :, 3:] = True
    vr = get_valid_ratio(mask)
    torch.testing.assert_close(vr, torch.tensor([[1.0, 1.0], [0.5, 0.5]]))
    ref = DeformableTransformerEncoder.get_reference_points([(4, 6)], vr[:, None])
    assert ref.shape == (2, 24, 1, 2)
    # pixel centres relative to the valid area, rescaled to the padded map: x = (j + 0.5) / W
    torch.testing.assert_close(ref[0, 1, 0], torch.tensor([1.5 / 6, 0.5 / 4]))
    torch.testing.assert_close(ref[1, 1, 0], torch.tensor([1.5 / 6, 0.5 / 4]))


def test_encoder_output_proposals():
    N, H, W, C = 1, 4, 4, 8
    memory = torch.randn(N, H * W, C)
    mask = torch.zeros(N, H, W, dtype=torch.bool)
    mask[:, :, 2:] = True
    out_memory, proposals = gen_encoder_output_proposals(memory, mask.flatten(1), [(H, W)])
    assert torch.isinf(proposals[0].view(H, W, 4)[:, 2:]).all()
    assert (out_memory[0].view(H, W, C)[:, 2:] == 0).all()
    valid = proposals[0].view(H, W, 4)[:, :2].sigmoid()
    # cell (row 1, col 0): centre ((0.5)/2, (1.5)/4), size 0.05
    torch.testing.assert_close(valid[1, 0], torch.tensor([0.25, 0.375, 0.05, 0.05]))


def test_decoder_refinement_detaches_references():
    layer = DeformableTransformerDecoderLayer(embed_dim=32, num_heads=4, num_levels=1, num_points=2, ffn_dim=64)
    decoder = DeformableTransformerDecoder(layer, num_layers=2)
    decoder.bbox_embed = torch.nn.ModuleList([torch.nn.Linear(32, 4) for _ in range(2)])
    memory = torch.randn(1, 12, 32)
    ref = torch.rand(1, 5, 2, requires_grad=True)
    hs, refs = decoder(
        torch.randn(1, 5, 32), ref, memory, torch.tensor([[3, 4]]), torch.tensor([0]), torch.ones(1, 1, 2),
        query_pos=torch.randn(1, 5, 32),
    )
    assert hs.shape == (2, 1, 5, 32) and refs.shape == (2, 1, 5, 4)
    assert not refs.requires_grad
    assert ((refs > 0) & (refs < 1)).all()
