"""DAB-DETR (projects/dab_detr): the paper's model size, configs, anchor queries, losses,
training, inference, patterns and export."""
import glob
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate

from helpers import (TINY_SINGLE_SCALE, assert_losses_weighted, assert_torch_export_matches,
                     assert_trace_matches_eager, build_model, expected_loss_keys, synthetic_batch,
                     training_step, with_original_sizes)

from d2detr.modeling.conditional_transformer import gen_sineembed_for_position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG_DIR = os.path.join(ROOT, "projects/dab_detr/configs")
MODEL_CFG = os.path.join(CFG_DIR, "models/dab_detr_r50.py")
TINY = {**TINY_SINGLE_SCALE, "model.num_queries": 12}


def build(overrides=None, cfg_file=MODEL_CFG):
    return build_model(cfg_file, overrides)


def tiny(**kwargs):
    torch.manual_seed(0)
    return build({**TINY, **kwargs})


def test_dab_detr_r50_has_the_papers_44m_parameters():
    """At 91 COCO ids: 43,671,517 parameters, exactly transformers' DabDetr R50 (paper: 44M)."""
    model = build({"model.num_classes": 91})
    total = sum(p.numel() for p in model.parameters())
    assert total == 43_671_517
    assert 43.5 <= total / 1e6 <= 44.0
    t = model.transformer
    assert t.d_model == 256 and t.nhead == 8 and t.num_patterns == 0 and t.patterns is None
    assert len(t.encoder.layers) == 6 and len(t.decoder.layers) == 6
    assert isinstance(t.encoder.layers[0].activation, torch.nn.PReLU)
    assert isinstance(t.decoder.layers[0].activation, torch.nn.PReLU)
    assert t.decoder.layers[0].dropout.p == 0.0
    assert model.position_embedding.temperature == 20
    assert model.refpoint_embed.weight.shape == (300, 4)
    assert t.decoder.ref_point_head.layers[0].in_features == 512  # MLP(PE(x, y, w, h))
    assert t.decoder.bbox_embed is model.bbox_embed  # anchors refined by the shared box head
    assert model.class_embed.out_features == 91
    assert model.select_box_nums_for_evaluation == 300  # the official --num_select
    c = model.criterion
    assert c.use_focal and c.weight_dict == {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    assert (c.matcher.cost_class, c.matcher.cost_bbox, c.matcher.cost_giou) == (2.0, 5.0, 2.0)
    # 3 patterns add 3 x 256 parameters and triple the predictions
    m3 = build({"model.num_classes": 91}, os.path.join(CFG_DIR, "models/dab_detr_r50_3patterns.py"))
    assert sum(p.numel() for p in m3.parameters()) == total + 3 * 256


@pytest.mark.parametrize("name", sorted(os.path.basename(f)[:-3] for f in glob.glob(os.path.join(CFG_DIR, "dab_detr_*ep.py"))))
def test_configs_carry_the_official_recipe(name):
    cfg = LazyConfig.load(os.path.join(CFG_DIR, name + ".py"))
    assert cfg.model.backbone.depth == (101 if "r101" in name else 50)
    assert cfg.model.backbone.dc5 == ("dc5" in name)
    assert cfg.model.transformer.num_patterns == (3 if "3patterns" in name else 0)
    assert cfg.model.num_queries == 300
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.weight_decay == 1e-4
    assert dict(cfg.optimizer.params.lr_factor_func.factors) == {"backbone": 0.1}
    assert cfg.train.clip_grad.params.max_norm == 0.1 and cfg.dataloader.train.total_batch_size == 16
    assert cfg.train.max_iter == 50 * -(-118287 // 16)
    sched = instantiate(cfg.lr_multiplier)
    assert sched(39.5 / 50) == 1.0 and sched(40.5 / 50) == pytest.approx(0.1)
    assert name in cfg.train.output_dir


def test_dc5_r101_config_instantiates_with_optimizer():
    cfg = LazyConfig.load(os.path.join(CFG_DIR, "dab_detr_r101_dc5_50ep.py"))
    model = instantiate(cfg.model)
    assert model.backbone.output_shape()["res5"].stride == 16
    assert 62.0 < sum(p.numel() for p in model.parameters()) / 1e6 < 63.0  # paper: 63M
    cfg.optimizer.params.model = model
    opt = instantiate(cfg.optimizer)
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs[id(model.backbone.res5[0].conv1.weight)] == pytest.approx(1e-5)
    assert lrs[id(model.refpoint_embed.weight)] == pytest.approx(1e-4)


def test_first_layer_boxes_are_the_anchors_and_anchors_are_refined():
    """Layer 0's anchors are sigmoid(refpoint_embed); with the box head at its zero
    initialisation every layer's box equals its anchor; once the head predicts offsets,
    layer i+1's anchors are layer i's boxes."""
    model = tiny().eval()
    images, masks = model.preprocess_image(synthetic_batch())
    with torch.no_grad():
        out = model.forward_features(images, masks)
    anchors = model.refpoint_embed.weight.sigmoid()
    assert out["anchors"].shape == (3, 2, 12, 4)
    for layer_anchors in out["anchors"]:
        torch.testing.assert_close(layer_anchors, anchors.expand(2, -1, -1))
    torch.testing.assert_close(out["pred_boxes"], anchors.expand(2, -1, -1), atol=1e-6, rtol=0)

    torch.nn.init.normal_(model.bbox_embed.layers[-1].weight, std=0.05)
    with torch.no_grad():
        out = model.forward_features(images, masks)
    boxes = [a["pred_boxes"] for a in out["aux_outputs"]] + [out["pred_boxes"]]
    for i in range(2):
        torch.testing.assert_close(out["anchors"][i + 1], boxes[i], atol=1e-6, rtol=0)
    assert (out["anchors"][1] - out["anchors"][0]).abs().max() > 1e-3


def test_width_height_modulation_of_the_spatial_query():
    """The x part of PE(x, y) is scaled by w_ref / w and the y part by h_ref / h: an anchor
    twice as wide gives an x part half as large (for the same w_ref)."""
    model = tiny().eval()
    dec = model.transformer.decoder
    captured = []
    hook = dec.layers[0].register_forward_pre_hook(lambda m, args: captured.append(args[4]))
    images, masks = model.preprocess_image(synthetic_batch())
    w = model.refpoint_embed.weight
    with torch.no_grad():
        w[0] = torch.logit(torch.tensor([0.5, 0.5, 0.1, 0.2]))
        w[1] = torch.logit(torch.tensor([0.5, 0.5, 0.2, 0.2]))
        model.forward_features(images, masks)
    hook.remove()
    spatial = captured[0]  # layer 0: [B, Q, d] = (y part, x part)
    half = 32
    torch.testing.assert_close(spatial[:, 1, half:] * 2, spatial[:, 0, half:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(spatial[:, 1, :half], spatial[:, 0, :half], atol=1e-5, rtol=1e-5)
    ref_hw = dec.ref_anchor_head(torch.zeros(1, 64)).sigmoid()[0]  # layer 0 sees tgt = 0
    sine = gen_sineembed_for_position(torch.tensor([0.5, 0.5]), half)
    torch.testing.assert_close(spatial[0, 0, half:], sine[half:] * ref_hw[0] / 0.1, atol=1e-5, rtol=1e-5)


def test_training_step_gives_finite_weighted_losses_with_aux_keys():
    model = tiny()
    batch = synthetic_batch()
    expected = expected_loss_keys(num_aux=2)
    training_step(model, batch, expected)
    dec = model.transformer.decoder
    for p in (model.class_embed.weight, model.refpoint_embed.weight, dec.ref_point_head.layers[0].weight,
              dec.ref_anchor_head.layers[0].weight, dec.query_scale.layers[0].weight,
              model.transformer.encoder.query_scale.layers[0].weight,
              model.transformer.encoder.layers[0].activation.weight, model.backbone.res5[0].conv1.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0

    assert_losses_weighted(model, batch, expected, {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0},
                           use_focal=True)


def test_patterns_and_random_refpoints():
    model = tiny(**{"model.transformer.num_patterns": 3, "model.random_refpoints_xy": True}).eval()
    xy = model.refpoint_embed.weight[:, :2].sigmoid()
    assert ((xy > 0) & (xy < 1)).all() and xy.std() > 0.1
    images, masks = model.preprocess_image(synthetic_batch())
    with torch.no_grad():
        out = model.forward_features(images, masks)
    assert out["pred_logits"].shape == (2, 36, 3) and out["pred_boxes"].shape == (2, 36, 4)
    a = out["anchors"][0]  # pattern-major: the 12 anchors once per pattern
    torch.testing.assert_close(a[:, :12], a[:, 12:24])
    # same anchor, different pattern -> different prediction
    assert (out["pred_logits"][:, :12] - out["pred_logits"][:, 12:24]).abs().max() > 1e-4
    model.train()
    losses = model(synthetic_batch())
    assert all(torch.isfinite(v) for v in losses.values())


def test_inference_returns_instances_in_original_image_size():
    model = tiny(**{"model.num_queries": 40}).eval()
    batch = synthetic_batch()
    originals = [(128, 96), (80, 200)]
    with_original_sizes(batch, originals)
    with torch.no_grad():
        results = model(batch)
    for res, (h, w) in zip(results, originals):
        inst = res["instances"]
        assert inst.image_size == (h, w) and len(inst) == 120  # top-300 capped at 40 queries x 3 classes
        b = inst.pred_boxes.tensor
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert (inst.scores[:-1] >= inst.scores[1:]).all()


def test_export_wrapper_traces_and_matches_eager():
    assert_trace_matches_eager(tiny())


def test_torch_export_with_dynamic_image_size(tmp_path):
    assert_torch_export_matches(tiny(), tmp_path, synthetic_batch()[0]["image"], min_size=64)
