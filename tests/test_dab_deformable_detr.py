"""DAB-Deformable-DETR (projects/dab_deformable_detr): configs, anchor queries driving the
deformable decoder, box refinement, two-stage, losses, inference and export. Tiny models, CPU."""
import glob
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate

from helpers import (assert_torch_export_matches, assert_trace_matches_eager, expected_loss_keys,
                     synthetic_batch, training_step, with_original_sizes)

from d2detr.modeling.conditional_transformer import gen_sineembed_for_position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG_DIR = os.path.join(ROOT, "projects/dab_deformable_detr/configs")


def tiny(two_stage=False, num_classes=3, dec_layers=3, **kwargs):
    """ResNet-18, width 64, 1 encoder / ``dec_layers`` decoder layers, 10 queries."""
    cfg = LazyConfig.load(os.path.join(CFG_DIR, "models/dab_deformable_detr_r50.py"))
    m = cfg.model
    m.backbone.depth = 18
    for f, c in zip(("res3", "res4", "res5"), (128, 256, 512)):
        m.neck.input_shapes[f].channels = c
    m.neck.out_channels = m.embed_dim = m.transformer.embed_dim = m.transformer.decoder.embed_dim = 64
    m.position_embedding.num_pos_feats = 32
    m.num_classes = num_classes
    m.num_queries = 10
    m.transformer.two_stage = two_stage
    m.transformer.encoder.num_layers = 1
    m.transformer.decoder.num_layers = dec_layers
    for layer in (m.transformer.encoder.encoder_layer, m.transformer.decoder.decoder_layer):
        layer.embed_dim = 64
        layer.ffn_dim = 128
    for k, v in kwargs.items():
        setattr(m, k, v)
    torch.manual_seed(0)
    return instantiate(m)


def test_r50_model_structure_and_size():
    cfg = LazyConfig.load(os.path.join(CFG_DIR, "models/dab_deformable_detr_r50.py"))
    cfg.model.num_classes = 91
    model = instantiate(cfg.model)
    total = sum(p.numel() for p in model.parameters())
    assert total == 47_405_994  # Deformable DETR R50 + box refinement with FFN 2048 and anchor queries
    t = model.transformer
    assert not hasattr(t, "reference_points") and not hasattr(model, "query_embed")
    assert model.tgt_embed.weight.shape == (300, 256) and model.refpoint_embed.weight.shape == (300, 4)
    assert t.decoder.ref_point_head.layers[0].in_features == 512
    assert t.decoder.layers[0].linear1.out_features == 2048 and t.decoder.layers[0].dropout1.p == 0.0
    assert t.decoder.bbox_embed is model.bbox_embed and len(model.bbox_embed) == 6
    assert model.bbox_embed[0] is not model.bbox_embed[1]  # one head per layer (box refinement)
    c = model.criterion
    assert c.use_focal and c.weight_dict == {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    assert (c.matcher.cost_class, c.matcher.cost_bbox, c.matcher.cost_giou) == (2.0, 5.0, 2.0)


@pytest.mark.parametrize("name", sorted(os.path.basename(f)[:-3] for f in glob.glob(os.path.join(CFG_DIR, "*_50ep.py"))))
def test_configs_carry_the_recipe_and_build(name):
    cfg = LazyConfig.load(os.path.join(CFG_DIR, name + ".py"))
    assert cfg.model.transformer.two_stage == ("two_stage" in name)
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.weight_decay == 1e-4
    # the official DAB-DETR optimizer: only the backbone at 0.1 x lr
    assert dict(cfg.optimizer.params.lr_factor_func.factors) == {"backbone": 0.1}
    assert cfg.train.max_iter == 50 * -(-118287 // 16) and cfg.dataloader.train.total_batch_size == 16
    sched = instantiate(cfg.lr_multiplier)
    assert sched(39.5 / 50) == 1.0 and sched(40.5 / 50) == pytest.approx(0.1)
    model = instantiate(cfg.model)
    cfg.optimizer.params.model = model
    opt = instantiate(cfg.optimizer)
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    attn = model.transformer.decoder.layers[0].cross_attn
    assert lrs[id(attn.sampling_offsets.weight)] == pytest.approx(1e-4)
    assert lrs[id(model.backbone.res5[0].conv1.weight)] == pytest.approx(1e-5)
    if "two_stage" not in name:
        assert lrs[id(model.refpoint_embed.weight)] == pytest.approx(1e-4)


def test_positional_queries_come_from_the_anchors():
    """Layer 0 gets query_pos = ref_point_head(PE(anchor scaled by the first level's valid
    ratios)); layer 1 the same of its refined anchor times query_scale(f)."""
    model = tiny().eval()
    dec = model.transformer.decoder
    seen = []
    hooks = [l.register_forward_pre_hook(lambda m, a: seen.append((a[0], a[1], a[2]))) for l in dec.layers]
    batch = synthetic_batch()
    batch[1]["image"] = batch[1]["image"][:, :48, :40]
    images, masks = model.preprocess_image(batch)
    with torch.no_grad():
        out = model.forward_features(images, masks)
    for h in hooks:
        h.remove()
    anchors = model.refpoint_embed.weight.sigmoid()
    tgt0, pos0, ref_in0 = seen[0]
    torch.testing.assert_close(tgt0, model.tgt_embed.weight.expand(2, -1, -1))
    vr = ref_in0[:, 0, 0, :2] / anchors[0, :2]  # valid ratios of level 0
    assert vr[0].tolist() == pytest.approx([1.0, 1.0]) and vr[1, 0] < 1 and vr[1, 1] < 1
    with torch.no_grad():
        scaled = anchors[None] * torch.cat([vr, vr], -1)[:, None]
        ref_pos0 = dec.ref_point_head(gen_sineembed_for_position(scaled, 32))
        torch.testing.assert_close(pos0, ref_pos0, atol=1e-5, rtol=0)
        tgt1, pos1, ref_in1 = seen[1]
        a1 = out["anchors"][1]
        ref_pos1 = dec.ref_point_head(gen_sineembed_for_position(a1 * torch.cat([vr, vr], -1)[:, None], 32))
        torch.testing.assert_close(pos1, ref_pos1 * dec.query_scale(tgt1), atol=1e-5, rtol=0)


def test_anchors_are_refined_layer_by_layer():
    model = tiny().eval()
    for head in model.bbox_embed:
        torch.nn.init.normal_(head.layers[-1].weight, std=0.05)
    images, masks = model.preprocess_image(synthetic_batch())
    model.train()  # aux outputs
    with torch.no_grad():
        out = model.forward_features(images, masks)
    torch.testing.assert_close(out["anchors"][0], model.refpoint_embed.weight.sigmoid().expand(2, -1, -1))
    boxes = [a["pred_boxes"] for a in out["aux_outputs"]] + [out["pred_boxes"]]
    for i in range(2):
        torch.testing.assert_close(out["anchors"][i + 1], boxes[i], atol=1e-6, rtol=0)


@pytest.mark.parametrize("two_stage", [False, True], ids=["single-stage", "two-stage"])
def test_training_step_gives_finite_weighted_losses(two_stage):
    model = tiny(two_stage=two_stage)
    training_step(model, synthetic_batch(), expected_loss_keys(num_aux=2, enc=two_stage))
    dec = model.transformer.decoder
    params = [dec.ref_point_head.layers[0].weight, dec.query_scale.layers[0].weight,
              model.class_embed[0].weight, model.backbone.res5[0].conv1.weight]
    params += [model.transformer.enc_output.weight] if two_stage else [model.tgt_embed.weight, model.refpoint_embed.weight]
    for p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_two_stage_anchors_are_the_top_proposals():
    model = tiny(two_stage=True).eval()
    images, masks = model.preprocess_image(synthetic_batch())
    with torch.no_grad():
        out = model.forward_features(images, masks)
    first = out["anchors"][0]
    assert first.shape == (2, 10, 4) and ((first > 0) & (first < 1)).all()
    assert first.std(1).min() > 1e-3  # different proposals, not one learned box


def test_inference_returns_instances_in_original_image_size():
    model = tiny().eval()
    batch = synthetic_batch()
    originals = [(128, 96), (80, 200)]
    with_original_sizes(batch, originals)
    with torch.no_grad():
        results = model(batch)
    for res, (h, w) in zip(results, originals):
        inst = res["instances"]
        assert inst.image_size == (h, w) and len(inst) == 30  # top-100 capped at 10 queries x 3 classes
        b = inst.pred_boxes.tensor
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert (inst.scores[:-1] >= inst.scores[1:]).all()


def test_export_wrapper_traces_and_matches_eager():
    assert_trace_matches_eager(tiny())


@pytest.mark.slow  # ~45 s on 2 CPU cores
def test_torch_export_with_dynamic_image_size(tmp_path):
    model = tiny()
    # >= 2 cells on the stride-64 level: torch.export specialises size-1 dimensions
    img = torch.randint(0, 255, (3, 128, 160), dtype=torch.uint8)
    assert_torch_export_matches(model, tmp_path, img, min_size=72)
