"""Conditional DETR (projects/conditional_detr): the paper's model size, configs, losses,
training, inference, conditional spatial queries, attention maps and export."""
import glob
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate

from helpers import (TINY_SINGLE_SCALE, assert_losses_weighted, assert_torch_export_matches, build_model,
                     expected_loss_keys, synthetic_batch, training_step, with_original_sizes)

from d2detr.modeling.conditional_transformer import (
    ConditionalAttention,
    ConditionalDetrTransformer,
    gen_sineembed_for_position,
    record_cross_attention,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG_DIR = os.path.join(ROOT, "projects/conditional_detr/configs")
MODEL_CFG = os.path.join(CFG_DIR, "models/conditional_detr_r50.py")
TINY = {**TINY_SINGLE_SCALE, "model.num_queries": 12}


def build(overrides=None, cfg_file=MODEL_CFG):
    return build_model(cfg_file, overrides)


def tiny(**kwargs):
    torch.manual_seed(0)
    return build({**TINY, **kwargs})


def test_conditional_detr_r50_has_the_papers_44m_parameters():
    """At 91 COCO ids: 43,418,401 parameters, exactly transformers' ConditionalDetr R50
    (43,196,001 trainable: stem and res2 frozen); the paper rounds to 44M."""
    model = build({"model.num_classes": 91})
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == 43_418_401 and trainable == 43_196_001
    assert 43.0 <= total / 1e6 <= 44.0
    t = model.transformer
    assert isinstance(t, ConditionalDetrTransformer) and t.d_model == 256 and t.nhead == 8
    assert len(t.encoder.layers) == 6 and len(t.decoder.layers) == 6
    # the content query is added to the spatial one only in the first layer
    assert t.decoder.layers[0].ca_qpos_proj is not None
    assert all(l.ca_qpos_proj is None for l in t.decoder.layers[1:])
    assert t.decoder.layers[0].cross_attn.embed_dim == 512  # content ; spatial concatenated
    assert model.query_embed.weight.shape == (300, 256)
    assert model.class_embed.out_features == 91  # sigmoid classes, no no-object logit
    assert model.use_focal and model.select_box_nums_for_evaluation == 100
    c = model.criterion
    assert c.use_focal and c.focal_alpha == 0.25 and c.focal_gamma == 2.0
    assert c.weight_dict == {"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    assert (c.matcher.cost_class, c.matcher.cost_bbox, c.matcher.cost_giou) == (2.0, 5.0, 2.0)
    # focal prior: every class starts at probability 0.01; boxes start at the reference point
    torch.testing.assert_close(model.class_embed.bias.sigmoid(), torch.full((91,), 0.01))
    assert model.bbox_embed.layers[-1].weight.abs().sum() == 0


CONFIGS = {  # name: (depth, dc5, epochs, lr drop epoch)
    os.path.basename(f)[:-3]: None for f in glob.glob(os.path.join(CFG_DIR, "conditional_detr_*ep.py"))
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_configs_carry_the_official_recipe(name):
    cfg = LazyConfig.load(os.path.join(CFG_DIR, name + ".py"))
    epochs = 108 if name.endswith("108ep") else 50
    drop = 80 if epochs == 108 else 40
    assert cfg.model.backbone.depth == (101 if "r101" in name else 50)
    assert cfg.model.backbone.dc5 == ("dc5" in name)
    assert cfg.model.num_queries == 300 and cfg.model.num_classes == 80
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.weight_decay == 1e-4
    assert dict(cfg.optimizer.params.lr_factor_func.factors) == {"backbone": 0.1}
    assert cfg.train.clip_grad.enabled and cfg.train.clip_grad.params.max_norm == 0.1
    assert cfg.dataloader.train.total_batch_size == 16
    assert cfg.train.max_iter == epochs * -(-118287 // 16)
    sched = instantiate(cfg.lr_multiplier)
    assert sched((drop - 0.5) / epochs) == 1.0 and sched((drop + 0.5) / epochs) == pytest.approx(0.1)
    assert name in cfg.train.output_dir


def test_configs_instantiate_with_optimizer():
    cfg = LazyConfig.load(os.path.join(CFG_DIR, "conditional_detr_r101_dc5_50ep.py"))
    model = instantiate(cfg.model)
    assert model.backbone.output_shape()["res5"].stride == 16
    assert 62.0 < sum(p.numel() for p in model.parameters()) / 1e6 < 63.0  # paper: 63M
    cfg.optimizer.params.model = model
    opt = instantiate(cfg.optimizer)
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs[id(model.backbone.res5[0].conv1.weight)] == pytest.approx(1e-5)
    assert lrs[id(model.transformer.decoder.layers[0].ca_qpos_sine_proj.weight)] == pytest.approx(1e-4)


def test_sine_embedding_of_points():
    """(x, y) -> [PE(y), PE(x)], each 2π·c/10000^(2⌊i/2⌋/d) with sin/cos interleaved;
    4-D points append PE(w), PE(h)."""
    pos = torch.tensor([[0.25, 0.75, 0.1, 0.5]])
    d = 8
    emb = gen_sineembed_for_position(pos, d)
    dim_t = 10000 ** (2 * (torch.arange(d) // 2) / d)
    for j, c in enumerate([0.75, 0.25, 0.1, 0.5]):  # y, x, w, h
        v = 2 * torch.pi * c / dim_t
        ref = torch.where(torch.arange(d) % 2 == 0, v.sin(), v.cos())
        torch.testing.assert_close(emb[0, j * d:(j + 1) * d], ref)
    torch.testing.assert_close(gen_sineembed_for_position(pos[:, :2], d), emb[:, : 2 * d])
    with pytest.raises(ValueError):
        gen_sineembed_for_position(torch.zeros(1, 3))


def test_conditional_attention_matches_reference_and_masks_keys():
    torch.manual_seed(0)
    attn = ConditionalAttention(16, 2, vdim=8).eval()
    q, k, v = torch.randn(2, 3, 16), torch.randn(2, 5, 16), torch.randn(2, 5, 8)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, 3:] = True
    out, w = attn(q, k, v, key_padding_mask=mask)
    # reference: per head, softmax(q k^T / sqrt(8)) v, heads concatenated, out_proj
    ref = []
    for h in range(2):
        s = q[..., h * 8:(h + 1) * 8] @ k[..., h * 8:(h + 1) * 8].transpose(1, 2) / 8 ** 0.5
        s = s.masked_fill(mask[:, None], float("-inf")).softmax(-1)
        ref.append(s @ v[..., h * 4:(h + 1) * 4])
    torch.testing.assert_close(out, attn.out_proj(torch.cat(ref, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3))
    assert (w[1, :, 3:] == 0).all()


def test_training_step_gives_finite_weighted_losses_with_aux_keys():
    model = tiny()
    batch = synthetic_batch()
    expected = expected_loss_keys(num_aux=2)  # 3 decoder layers -> 2 aux sets
    training_step(model, batch, expected)
    dec = model.transformer.decoder
    for p in (model.class_embed.weight, model.query_embed.weight, dec.ref_point_head.layers[0].weight,
              dec.query_scale.layers[0].weight, dec.layers[1].ca_qpos_sine_proj.weight,
              model.backbone.res5[0].conv1.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert model.backbone.stem.conv1.weight.grad is None  # frozen

    assert_losses_weighted(model, batch, expected, {"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0},
                           use_focal=True)


def test_boxes_start_at_the_conditional_reference_points():
    """With the box head's last layer at zero (its initialisation), every layer's box centre
    is the query's reference point s = sigmoid(MLP(query embedding))."""
    model = tiny().eval()
    images, masks = model.preprocess_image(synthetic_batch())
    with torch.no_grad():
        out = model.forward_features(images, masks)
        s = model.transformer.decoder.ref_point_head(model.query_embed.weight).sigmoid()
    torch.testing.assert_close(out["reference_points"][0], s)
    torch.testing.assert_close(out["pred_boxes"][..., :2], s.expand(2, -1, -1), atol=1e-5, rtol=0)
    for aux in out["aux_outputs"]:
        torch.testing.assert_close(aux["pred_boxes"][..., :2], s.expand(2, -1, -1), atol=1e-5, rtol=0)


def test_inference_returns_top100_instances_in_original_image_size():
    model = tiny(**{"model.num_queries": 50}).eval()
    batch = synthetic_batch()
    originals = [(128, 96), (80, 200)]
    with_original_sizes(batch, originals)
    with torch.no_grad():
        results = model(batch)
    for res, (h, w) in zip(results, originals):
        inst = res["instances"]
        assert inst.image_size == (h, w)
        assert len(inst) == 100  # top-100 over 50 queries x 3 classes
        b = inst.pred_boxes.tensor
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert (inst.scores[:-1] >= inst.scores[1:]).all()
        assert ((inst.pred_classes >= 0) & (inst.pred_classes < 3)).all()


def test_cross_attention_maps_ignore_padding():
    """Forward hooks on each decoder layer's ``cross_attn`` give [B, Q, HW] maps (for
    visualisation) that put no weight on padded positions."""
    model = tiny().eval()
    batch = synthetic_batch()
    batch[1]["image"] = batch[1]["image"][:, :40, :48]
    maps = []
    hooks = [l.cross_attn.register_forward_hook(lambda m, i, o: maps.append(o[1]))
             for l in model.transformer.decoder.layers]
    images, masks = model.preprocess_image(batch)
    with torch.no_grad():
        model.forward_features(images, masks)
    for h in hooks:
        h.remove()
    assert len(maps) == 3
    feat_mask = torch.nn.functional.interpolate(masks[None].float(), size=(2, 2))[0].bool().flatten(1)
    for m in maps:
        assert m.shape == (2, 12, 4)
        torch.testing.assert_close(m.sum(-1), torch.ones(2, 12))
        assert (m[feat_mask[:, None, :].expand_as(m)] == 0).all()


def test_export_wrapper_traces_and_matches_eager():
    from d2detr.export.wrapper import ExportableDetector

    model = tiny().eval()
    img = synthetic_batch()[0]["image"]
    wrapper = ExportableDetector(model)
    with torch.no_grad():
        boxes, scores, classes = wrapper(img)
        traced = torch.jit.trace(wrapper, (img,), check_trace=False)
        img2 = synthetic_batch()[1]["image"][:, :48, :56]
        tb, ts, tc = traced(img2)
        eb, es, ec = wrapper(img2)
    torch.testing.assert_close(tb, eb, atol=1e-4, rtol=0)
    torch.testing.assert_close(ts, es, atol=1e-5, rtol=0)
    eager = model([{"image": img}])[0]["instances"]
    torch.testing.assert_close(scores, eager.scores, atol=1e-5, rtol=0)


def test_torch_export_with_dynamic_image_size(tmp_path):
    assert_torch_export_matches(tiny(), tmp_path, synthetic_batch()[0]["image"], min_size=64)


def test_record_cross_attention_context_manager():
    model = tiny().eval()
    images, masks = model.preprocess_image(synthetic_batch())
    with torch.no_grad(), record_cross_attention(model) as maps:
        model.forward_features(images, masks)
    assert len(maps) == 3 and all(m.shape == (2, 12, 4) for m in maps)
    with torch.no_grad():
        model.forward_features(images, masks)
    assert len(maps) == 3  # hooks removed on exit
    with pytest.raises(ValueError):
        with record_cross_attention(torch.nn.Linear(2, 2)):
            pass
