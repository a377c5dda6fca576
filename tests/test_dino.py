"""DINO: configs with the official hyperparameters, the official parameter count, contrastive
denoising (groups, noise, masks and indices against hand-computed cases and transformers' RT-DETR
implementation of the same scheme), mixed query selection, look-forward-twice, the denoising
losses, batches without / with one / with more objects than the denoising budget, inference that
never sees denoising, and the official checkpoint layout converted one to one."""
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes, Instances

from helpers import assert_trace_matches_eager
from tiny_configs import REPO, write_tiny_config

from d2detr.checkpoint import apply_overrides
from d2detr.modeling.denoising import ContrastiveDenoising, denoising_attn_mask, denoising_match_indices

CFG_DIR = os.path.join(REPO, "projects", "dino", "configs")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(tmp_path, **extra):
    text = "".join(f"model.{k} = {v!r}\n" for k, v in extra.items())
    cfg = LazyConfig.load(write_tiny_config(tmp_path, "dino", extra=text))
    torch.manual_seed(0)
    return instantiate(cfg.model)


def batch_with(counts, size=64):
    """Images with ``counts[i]`` boxes each (classes 0..2)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for n in counts:
        inst = Instances((size, size))
        xy = torch.rand(n, 2, generator=g) * (size - 20)
        wh = 6 + torch.rand(n, 2, generator=g) * 12
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
        inst.gt_classes = torch.arange(n) % 3
        img = torch.randint(0, 255, (3, size, size), dtype=torch.uint8, generator=g)
        out.append({"image": img, "instances": inst})
    return out


def train_forward(model, counts):
    """One training forward on ``batch_with(counts)``: the raw outputs, the normalised targets
    and the criterion's weighted losses (denoising noise seeded)."""
    batch = batch_with(counts)
    images, masks = model.preprocess_image(batch)
    targets = model.prepare_targets([x["instances"] for x in batch])
    model.train()
    torch.manual_seed(3)
    out = model.forward_features(images, masks, targets=targets)
    return out, targets, model.criterion(out, targets)


# ------------------------------------------------------------------------- configs
def test_r50_4scale_config_is_the_official_recipe():
    cfg = LazyConfig.load(os.path.join(CFG_DIR, "dino_r50_4scale_12ep.py"))
    m = cfg.model
    assert m.num_queries == 900 and m.transformer.two_stage_num_proposals == 900
    assert m.select_box_nums_for_evaluation == 300 and m.inverse_sigmoid_eps == 1e-3
    assert m.with_box_refine and m.share_decoder_heads and m.aux_loss
    assert (m.position_embedding.temperature, m.position_embedding.offset) == (20, 0.0)
    dec = m.transformer.decoder
    assert dec.look_forward_twice and not dec.query_scale and dec.norm.normalized_shape == 256
    for layer in (m.transformer.encoder.encoder_layer, dec.decoder_layer):
        assert (layer.ffn_dim, layer.dropout, layer.num_heads, layer.num_points, layer.num_levels) == (2048, 0.0, 8, 4, 4)
    assert m.transformer.encoder.num_layers == dec.num_layers == 6
    dn = m.denoising
    assert (dn.num_dn_queries, dn.label_noise_ratio, dn.box_noise_scale) == (100, 0.5, 1.0)  # the scripts' 1.0
    crit = m.criterion
    assert crit.weight_dict == {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0} and not crit.enc_class_agnostic
    assert (crit.matcher.cost_class, crit.matcher.cost_bbox, crit.matcher.cost_giou) == (2.0, 5.0, 2.0)
    assert m.backbone.freeze_at == 2 and m.neck.num_outs == 4
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.weight_decay == 1e-4
    assert dict(cfg.optimizer.params.lr_factor_func.factors) == {"backbone": 0.1}
    assert cfg.train.clip_grad.enabled and cfg.train.clip_grad.params.max_norm == 0.1
    assert cfg.dataloader.train.total_batch_size == 16
    iters_per_epoch = 7393  # ceil(118287 / 16)
    assert cfg.train.max_iter == 12 * iters_per_epoch
    assert list(cfg.lr_multiplier.milestones) == [11 * iters_per_epoch]


@pytest.mark.parametrize("name,epochs,drop,levels,depth", [
    ("dino_r50_4scale_24ep", 24, 20, 4, 50), ("dino_r50_4scale_36ep", 36, 30, 4, 50),
    ("dino_r50_5scale_12ep", 12, 11, 5, 50), ("dino_r101_4scale_12ep", 12, 11, 4, 101),
    ("dino_r101_5scale_36ep", 36, 30, 5, 101),
])
def test_schedules_scales_and_depths(name, epochs, drop, levels, depth):
    cfg = LazyConfig.load(os.path.join(CFG_DIR, name + ".py"))
    assert cfg.train.max_iter == epochs * 7393 and list(cfg.lr_multiplier.milestones) == [drop * 7393]
    m = cfg.model
    assert m.transformer.num_feature_levels == m.neck.num_outs == levels and m.backbone.depth == depth
    assert m.transformer.encoder.encoder_layer.num_levels == m.transformer.decoder.decoder_layer.num_levels == levels
    if levels == 5:  # res2 (stride 4) is the fifth, finest level
        assert list(m.neck.in_features) == ["res2", "res3", "res4", "res5"] == list(m.backbone.out_features)
        assert m.neck.input_shapes["res2"].channels == 256


def expected_dino_r50_parameters(num_classes=91, levels=4, queries=900, d=256, ffn=2048, heads=8, points=4):
    """Trainable parameters of the official DINO-4scale R50, summed from its module shapes
    (models/dino: backbone layer2-4 trainable, input_proj, 6+6 layers, shared heads, label_enc)."""
    import torchvision

    tv = torchvision.models.resnet50()
    backbone = sum(p.numel() for n, p in tv.named_parameters()
                   if n.startswith(("layer2", "layer3", "layer4")) and "bn" not in n and "downsample.1" not in n)
    lin = lambda i, o: i * o + o  # noqa: E731
    mlp3 = 2 * lin(d, d) + lin(d, 4)
    input_proj = sum(lin(c, d) + 2 * d for c in (512, 1024, 2048)) + (2048 * d * 9 + d + 2 * d)
    msda = lin(d, heads * levels * points * 2) + lin(d, heads * levels * points) + 2 * lin(d, d)
    ffn_p = lin(d, ffn) + lin(ffn, d)
    enc_layer = msda + 2 * d + ffn_p + 2 * d
    dec_layer = msda + 2 * d + (3 * d * d + 3 * d + lin(d, d)) + 2 * d + ffn_p + 2 * d
    transformer = (6 * enc_layer + 6 * dec_layer + 2 * d + (lin(2 * d, d) + lin(d, d))  # decoder norm, ref_point_head
                   + levels * d + queries * d + lin(d, d) + 2 * d  # level_embed, tgt_embed, enc_output(+norm)
                   + lin(d, num_classes) + mlp3)  # proposal heads
    heads_p = lin(d, num_classes) + mlp3  # shared by the decoder layers
    label_enc = (num_classes + 1) * d
    return backbone + input_proj + transformer + heads_p + label_enc


def test_r50_4scale_parameter_count_is_official():
    cfg = LazyConfig.load(os.path.join(CFG_DIR, "models", "dino_r50_4scale.py"))
    cfg.model.num_classes = 91
    model = instantiate(cfg.model)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == expected_dino_r50_parameters() == 46_670_782  # the paper: 47M
    # shared heads: one module for every decoder layer; separate proposal heads
    assert all(h is model.class_embed[0] for h in model.class_embed)
    assert model.transformer.decoder.bbox_embed is model.bbox_embed
    assert model.transformer.enc_out_class_embed is not model.class_embed[0]
    assert model.denoising.label_enc.weight.shape == (92, 256)


# ---------------------------------------------------------------- denoising queries
def test_groups_follow_the_largest_image():
    dn = ContrastiveDenoising(num_classes=3, embed_dim=8, num_dn_queries=100)
    t = lambda n: {"labels": torch.zeros(n, dtype=torch.long), "boxes": torch.full((n, 4), 0.3)}  # noqa: E731
    for counts, groups, max_gt in [([0, 0], 1, 0), ([1, 0], 100, 1), ([3, 1], 33, 3), ([150, 2], 1, 150)]:
        q = dn([t(n) for n in counts])
        assert (q.num_groups, q.max_gt, q.num_queries) == (groups, max_gt, 2 * groups * max_gt)
        assert q.tgt.shape == (2, q.num_queries, 8) and q.reference_points.shape == (2, q.num_queries, 4)


def test_attention_mask_hand_computed():
    # 2 groups of (1 positive, 1 negative), then 2 matching queries; 1 = may not attend
    expected = torch.tensor([
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
    ], dtype=torch.bool)
    assert torch.equal(denoising_attn_mask(2, 1, 2), expected)
    assert denoising_attn_mask(1, 0, 5) is None


def test_mask_groups_and_indices_match_transformers_rt_detr():
    """transformers' RT-DETR builds DINO's contrastive denoising groups: same group count,
    attention mask and positive query indices."""
    rt = pytest.importorskip("transformers.models.rt_detr.modeling_rt_detr")
    targets = [{"labels": torch.tensor([0, 2, 1]), "boxes": torch.rand(3, 4) * 0.3 + 0.2},
               {"labels": torch.tensor([1]), "boxes": torch.rand(1, 4) * 0.3 + 0.2}]
    hf_targets = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    _, _, hf_mask, meta = rt.get_contrastive_denoising_training_group(
        hf_targets, num_classes=3, num_queries=7, class_embed=torch.nn.Embedding(4, 8), num_denoising_queries=100)
    q = ContrastiveDenoising(num_classes=3, embed_dim=8, num_dn_queries=100)(targets)
    assert q.num_groups == meta["dn_num_group"] == 33
    assert torch.equal(q.attn_mask(7), torch.isinf(hf_mask))
    for (query, tgt), hf_idx, t in zip(denoising_match_indices(targets, q.meta), meta["dn_positive_idx"], targets):
        assert torch.equal(query, hf_idx)
        assert torch.equal(tgt, torch.arange(len(t["labels"])).repeat(q.num_groups))


def test_box_noise_positives_inside_half_size_negatives_between_one_and_two():
    torch.manual_seed(0)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.1], [0.5, 0.5, 0.1, 0.2]])  # 2 half sizes from any corner stay inside
    dn = ContrastiveDenoising(num_classes=3, embed_dim=8, num_dn_queries=100, label_noise_ratio=0.0, box_noise_scale=1.0)
    dn.inverse_sigmoid_eps = 1e-3
    q = dn([{"labels": torch.tensor([0, 1]), "boxes": boxes}])
    from d2detr.layers.box_ops import box_cxcywh_to_xyxy

    ref = q.reference_points[0].view(2 * q.num_groups, 2, 4)
    shift = (box_cxcywh_to_xyxy(ref) - box_cxcywh_to_xyxy(boxes)).abs() / boxes[:, 2:].repeat(1, 2) * 2  # half sizes
    # corners that crossed over give a negative size, clamped by inverse_sigmoid: not invertible, left out
    kept = (ref[..., 2:] > 2e-3).all(-1)
    pos, neg = shift[0::2][kept[0::2]], shift[1::2][kept[1::2]]
    assert len(pos) == 2 * q.num_groups and len(neg) > q.num_groups // 2
    assert (pos < 1 + 1e-3).all() and (neg >= 1 - 1e-3).all() and (neg < 2 + 1e-3).all()
    assert pos.mean() < 0.6 and neg.mean() > 1.4  # uniform in [0, 1) and [1, 2)
    # no label noise: the content is the label embedding of the true class
    emb = dn.label_enc.weight
    torch.testing.assert_close(q.tgt[0, :2], emb[[0, 1]])


def test_label_noise_and_padding_slots():
    torch.manual_seed(0)
    dn = ContrastiveDenoising(num_classes=5, embed_dim=4, num_dn_queries=500, label_noise_ratio=1.0)
    targets = [{"labels": torch.full((2,), 4), "boxes": torch.full((2, 4), 0.4)},
               {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    q = dn(targets)
    emb = dn.label_enc.weight
    labels = (q.tgt[0][:, None, :] - emb[None, :5]).abs().sum(-1).argmin(-1)  # which class each slot encodes
    assert q.num_groups == 250 and labels.numel() == 1000
    # a label is replaced with p 0.5 by a uniform class, which differs from the true one with p 4/5
    assert 0.33 < (labels != 4).float().mean() < 0.47
    # the second image has no objects: every slot is padding (zero content, box logits 0)
    assert torch.count_nonzero(q.tgt[1]) == 0
    torch.testing.assert_close(q.reference_points[1], torch.full_like(q.reference_points[1], 0.5))


# ----------------------------------------------------------------- the detector
def test_losses_with_zero_one_and_too_many_objects(tmp_path):
    model = tiny(tmp_path, **{"denoising.num_dn_queries": 4})
    model.train()
    keys = None
    for counts in ([0, 0], [1, 0], [6, 2]):  # 6 objects > the budget of 4: one group
        losses = model(batch_with(counts))
        assert all(torch.isfinite(v) for v in losses.values())
        keys = keys or set(losses)
        assert set(losses) == keys  # the same keys every step (DDP metrics, logging)
        assert {"loss_class_dn", "loss_bbox_dn", "loss_giou_dn", "loss_bbox_dn_0", "loss_class_enc"} <= keys
        if sum(counts) == 0:
            assert losses["loss_bbox_dn"] == 0 and losses["loss_giou_dn"] == 0
        sum(losses.values()).backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, missing  # every parameter in the graph (DDP without find_unused_parameters)
        model.zero_grad()


def test_denoising_loss_is_normalised_by_boxes_times_groups(tmp_path):
    """``loss_bbox_dn`` = L1 of the positive denoising queries against their own targets, summed
    and divided by num_boxes * num_groups, times the weight 5."""
    model = tiny(tmp_path)
    out, targets, losses = train_forward(model, [2, 1])
    meta = out["dn_meta"]
    assert meta["num_groups"] == 50 and meta["max_gt"] == 2
    l1 = 0.0
    for b, (query, tgt) in enumerate(denoising_match_indices(targets, meta)):
        l1 = l1 + (out["dn_outputs"]["pred_boxes"][b, query] - targets[b]["boxes"][tgt]).abs().sum()
    torch.testing.assert_close(losses["loss_bbox_dn"], 5.0 * l1 / (3 * 50))
    # the matching part has 12 queries; the denoising part 2 * max_gt * groups
    assert out["pred_logits"].shape[1] == 12 and out["dn_outputs"]["pred_logits"].shape[1] == 200


def test_varifocal_class_loss_covers_denoising_matching_and_encoder_outputs(tmp_path):
    """With ``criterion.class_loss="varifocal"`` every set (matched, denoising, encoder) gets the
    IoU-aware target: ``loss_class_dn`` equals the varifocal loss recomputed here from the
    denoising outputs, their known targets and torchvision's IoU; the model still trains."""
    import torchvision

    from d2detr.layers.box_ops import box_cxcywh_to_xyxy
    from d2detr.modeling.losses import varifocal_loss

    model = tiny(tmp_path, **{"criterion.class_loss": "varifocal"})
    out, targets, losses = train_forward(model, [2, 1])
    meta, dn = out["dn_meta"], out["dn_outputs"]
    quality = torch.zeros_like(dn["pred_logits"])
    for b, (query, tgt) in enumerate(denoising_match_indices(targets, meta)):
        iou = torchvision.ops.box_iou(
            box_cxcywh_to_xyxy(dn["pred_boxes"][b, query].detach()), box_cxcywh_to_xyxy(targets[b]["boxes"][tgt])
        ).diagonal()
        quality[b, query, targets[b]["labels"][tgt]] = iou
    ref = varifocal_loss(dn["pred_logits"], quality, 0.75, 2.0, reduction="sum") / (3 * meta["num_groups"])
    torch.testing.assert_close(losses["loss_class_dn"], 1.0 * ref)
    assert {"loss_class_enc", "loss_class_0", "loss_class_dn_0"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_matching_queries_do_not_see_denoising_queries(tmp_path):
    """With the mask, the matching queries' outputs do not depend on the denoising queries."""
    model = tiny(tmp_path).eval()  # eval: no dropout; denoising passed by hand
    batch = batch_with([2, 1])
    images, masks = model.preprocess_image(batch)
    targets = model.prepare_targets([x["instances"] for x in batch])
    srcs, level_masks, pos = model.multi_scale_features(images, masks)
    with torch.no_grad():
        plain = model.transformer(srcs, level_masks, pos, None)[0]
        torch.manual_seed(0)
        q = model.denoising(targets)
        with_dn = model.transformer(srcs, level_masks, pos, None, denoising_queries=q)[0]
    torch.testing.assert_close(with_dn[:, :, q.num_queries:], plain, atol=1e-5, rtol=1e-5)


def test_look_forward_twice_trains_the_previous_box_head(tmp_path):
    """The loss of layer 1's boxes reaches layer 0's box head with look-forward-twice, not without."""
    for lft in (True, False):
        model = tiny(tmp_path, **{"share_decoder_heads": False, "transformer.decoder.look_forward_twice": lft})
        model.train()
        images, masks = model.preprocess_image(batch_with([1, 1]))
        srcs, level_masks, pos = model.multi_scale_features(images, masks)
        hs, init_ref, inter, *_ = model.transformer(srcs, level_masks, pos, None)  # + the dense proposals in training
        _, coords = model.predict_per_layer(hs, init_ref, inter)
        coords[1].sum().backward()
        grad = model.bbox_embed[0].layers[-1].weight.grad  # the last layer: zero-initialised weights
        assert (grad is not None and grad.abs().sum() > 0) == lft
        assert inter[0].requires_grad == lft


def test_mixed_query_selection(tmp_path):
    """Anchors = the top-k encoder proposals by their largest class logit (detached), content =
    the learned tgt_embed; an image with fewer tokens than queries selects all of them."""
    model = tiny(tmp_path, num_queries=200).eval()  # a 64x64 image has 8x8 + 4x4 + 2x2 = 84 tokens
    t = model.transformer
    images, masks = model.preprocess_image(batch_with([1]))
    srcs, level_masks, pos = model.multi_scale_features(images, masks)
    from d2detr.modeling.deformable_transformer import flatten_multi_level

    flat = flatten_multi_level(srcs, level_masks, pos, t.level_embed)
    src, mask, lvl_pos, shapes, starts, ratios, shapes_list = flat
    with torch.no_grad():
        memory = t.encode(src, shapes, starts, ratios, lvl_pos, mask, shapes_list)
        _, logits, coords = t.encoder_proposals(memory, mask, shapes_list)
        tgt, query_pos, ref, sel_logits, sel_coords = t.select_queries(memory, mask, shapes_list)[:5]
    assert memory.shape[1] == 84 and ref.shape[1] == tgt.shape[1] == 84  # all tokens, no failure
    assert not ref.requires_grad and query_pos is None
    best = logits.max(-1)[0].topk(84, dim=1)[1]
    torch.testing.assert_close(ref, coords.gather(1, best[..., None].expand(-1, -1, 4)).sigmoid())
    torch.testing.assert_close(sel_logits, logits.gather(1, best[..., None].expand(-1, -1, 3)))
    torch.testing.assert_close(tgt[0], t.tgt_embed.weight[:84])
    t.two_stage_num_proposals = 10  # fewer than the tokens: the 10 best by their largest class logit
    with torch.no_grad():
        tgt, _, ref, _, _ = t.select_queries(memory, mask, shapes_list)[:5]
    torch.testing.assert_close(ref, coords.gather(1, best[:, :10, None].expand(-1, -1, 4)).sigmoid())


def test_inference_is_unaffected_by_denoising(tmp_path):
    """Detections are the same with and without the denoising module (the same other weights)."""
    with_dn = tiny(tmp_path).eval()
    without = tiny(tmp_path, denoising=None).eval()
    state = {k: v for k, v in with_dn.state_dict().items() if not k.startswith("denoising.")}
    without.load_state_dict(state, strict=True)
    batch = [{"image": x["image"]} for x in batch_with([1, 1])]
    with torch.no_grad():
        a, b = with_dn(batch), without(batch)
    for x, y in zip(a, b):
        torch.testing.assert_close(x["instances"].scores, y["instances"].scores)
        torch.testing.assert_close(x["instances"].pred_boxes.tensor, y["instances"].pred_boxes.tensor)


def test_trace_matches_eager_on_another_size(tmp_path):
    """(torch.export with dynamic size, and both files in a fresh process: tests/test_export.py.)"""
    assert_trace_matches_eager(tiny(tmp_path))


# --------------------------------------------------------- official checkpoint layout
def official_dino_state_dict(num_classes=91, levels=4, queries=900, d=256, ffn=2048, heads=8, points=4, seed=0):
    """A state dict with the official DINO-4scale R50 key names and shapes, written from the
    official module definitions (models/dino/{dino,deformable_transformer,backbone}.py): the
    backbone is torchvision's ResNet-50 with FrozenBatchNorm2d buffers under ``backbone.0.body``."""
    import torchvision

    g = torch.Generator().manual_seed(seed)
    shapes = {}
    for k, v in torchvision.models.resnet50().state_dict().items():
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            continue
        shapes["backbone.0.body." + k] = v.shape
    for l, c in enumerate((512, 1024, 2048)):
        shapes.update({f"input_proj.{l}.0.weight": (d, c, 1, 1), f"input_proj.{l}.0.bias": (d,),
                       f"input_proj.{l}.1.weight": (d,), f"input_proj.{l}.1.bias": (d,)})
    shapes.update({"input_proj.3.0.weight": (d, 2048, 3, 3), "input_proj.3.0.bias": (d,),
                   "input_proj.3.1.weight": (d,), "input_proj.3.1.bias": (d,)})

    def lin(name, i, o):
        shapes[name + ".weight"], shapes[name + ".bias"] = (o, i), (o,)

    def msda(p):
        lin(p + ".sampling_offsets", d, heads * levels * points * 2)
        lin(p + ".attention_weights", d, heads * levels * points)
        lin(p + ".value_proj", d, d)
        lin(p + ".output_proj", d, d)

    def norm(name):
        shapes[name + ".weight"] = shapes[name + ".bias"] = (d,)

    def mlp3(p):
        lin(p + ".layers.0", d, d), lin(p + ".layers.1", d, d), lin(p + ".layers.2", d, 4)

    for i in range(6):
        p = f"transformer.encoder.layers.{i}"
        msda(p + ".self_attn"), norm(p + ".norm1"), lin(p + ".linear1", d, ffn), lin(p + ".linear2", ffn, d)
        norm(p + ".norm2")
        p = f"transformer.decoder.layers.{i}"
        msda(p + ".cross_attn"), norm(p + ".norm1"), norm(p + ".norm2"), norm(p + ".norm3")
        shapes[p + ".self_attn.in_proj_weight"], shapes[p + ".self_attn.in_proj_bias"] = (3 * d, d), (3 * d,)
        lin(p + ".self_attn.out_proj", d, d), lin(p + ".linear1", d, ffn), lin(p + ".linear2", ffn, d)
        for head in ("bbox_embed", "transformer.decoder.bbox_embed"):
            mlp3(f"{head}.{i}")
        for head in ("class_embed", "transformer.decoder.class_embed"):
            lin(f"{head}.{i}", d, num_classes)
    norm("transformer.decoder.norm")
    lin("transformer.decoder.ref_point_head.layers.0", 2 * d, d), lin("transformer.decoder.ref_point_head.layers.1", d, d)
    shapes["transformer.level_embed"] = (levels, d)
    shapes["transformer.tgt_embed.weight"] = (queries, d)
    lin("transformer.enc_output", d, d), norm("transformer.enc_output_norm")
    lin("transformer.enc_out_class_embed", d, num_classes), mlp3("transformer.enc_out_bbox_embed")
    shapes["label_enc.weight"] = (num_classes + 1, d)
    sd = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    for k in sd:
        if k.endswith("running_var"):
            sd[k] = sd[k].abs() + 0.5
    # shared heads: every layer's entry is the same tensor in the official file
    for i in range(6):
        for head in ("class_embed", "bbox_embed"):
            for k in [k for k in sd if k.startswith(f"{head}.0.")]:
                sd[k.replace(f"{head}.0.", f"{head}.{i}.", 1)] = sd[k]
                sd["transformer.decoder." + k.replace(f"{head}.0.", f"{head}.{i}.", 1)] = sd[k]
    return sd


@pytest.mark.parametrize("classes", ["keep", "coco80"])
def test_official_checkpoint_converts_one_to_one(tmp_path, classes):
    from d2detr.checkpoint import convert_hf_checkpoint, detect_model_type

    official = official_dino_state_dict()
    assert detect_model_type(official) == "dino_official"
    state, overrides = convert_hf_checkpoint(official, {}, model_type="dino_official", classes=classes)
    cfg = LazyConfig.load(os.path.join(CFG_DIR, "models", "dino_r50_4scale.py"))
    apply_overrides(cfg, overrides)
    model = instantiate(cfg.model)
    model.load_state_dict(state, strict=True)  # every tensor has its place, nothing is left over
    assert len([k for k in state if not k.startswith("backbone.")]) == len(
        [k for k in official if not k.startswith("backbone.0.body.")])
    torch.testing.assert_close(model.neck.input_proj[3][0].weight, official["input_proj.3.0.weight"])
    torch.testing.assert_close(model.transformer.tgt_embed.weight, official["transformer.tgt_embed.weight"])
    backbone = model.backbone.state_dict()
    torch.testing.assert_close(backbone["stem.conv1.weight"], official["backbone.0.body.conv1.weight"])
    torch.testing.assert_close(backbone["res5.2.conv3.norm.running_var"], official["backbone.0.body.layer4.2.bn3.running_var"])
    label_enc = model.denoising.label_enc.weight
    if classes == "keep":
        assert overrides["model.num_classes"] == 91 and label_enc.shape[0] == 92
        torch.testing.assert_close(label_enc, official["label_enc.weight"])
    else:
        from d2detr.checkpoint import coco91_to_contiguous_rows

        rows = coco91_to_contiguous_rows()
        assert overrides["model.num_classes"] == 80 and label_enc.shape[0] == 81
        torch.testing.assert_close(label_enc[5], official["label_enc.weight"][rows[5]])  # class 5 = COCO id 6
        torch.testing.assert_close(model.class_embed[0].weight[5], official["class_embed.0.weight"][rows[5]])
        torch.testing.assert_close(model.transformer.enc_out_class_embed.bias[79],
                                   official["transformer.enc_out_class_embed.bias"][rows[79]])
    assert overrides["model.num_queries"] == 900 and overrides["model.backbone.depth"] == 50


def test_convert_checkpoint_tool_on_an_official_file(tmp_path):
    """``tools/convert_checkpoint.py checkpoint0011_4scale.pth out.pth --config-file <DINO R50>``
    recognises the file, converts it and loads it strictly into the config's model."""
    from helpers import run_convert_checkpoint

    src = str(tmp_path / "checkpoint0011_4scale.pth")
    torch.save({"model": official_dino_state_dict(), "epoch": 11}, src)
    stdout, ckpt = run_convert_checkpoint(src, str(tmp_path / "dino_r50.pth"),
                                          os.path.join(CFG_DIR, "models", "dino_r50_4scale.py"))
    assert "converted dino_official" in stdout and "verified" in stdout
    assert ckpt["overrides"]["model.num_classes"] == 80  # 91 COCO ids -> Detectron2's 80 classes
    assert ckpt["model"]["denoising.label_enc.weight"].shape == (81, 256)
