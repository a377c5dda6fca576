"""Focus-DETR: configs with the PyTorch release's hyperparameters and its parameter count; the
foreground token selector against a direct re-computation of the release's formulas; FCOS-style
foreground labels and their focal loss against hand-computed cases and torchvision; the kept-token
counts (rho, cascade, per-image write-back); the sparse encoder against the dense layer on the same
tokens; sparse work really skipped (the op's query count in a profile, FLOPs against a hand count);
the dual attention; images with fewer tokens than any k; losses and gradients; tracing; the
release's checkpoint layout converted one to one."""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes, Instances

from helpers import assert_trace_matches_eager
from tiny_configs import REPO, write_tiny_config

from d2detr.checkpoint import apply_overrides
from d2detr.modeling.deformable_transformer import flatten_multi_level

CFG_DIR = os.path.join(REPO, "projects", "focus_detr", "configs")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(tmp_path, **extra):
    text = "".join(f"model.{k} = {v!r}\n" for k, v in extra.items())
    cfg = LazyConfig.load(write_tiny_config(tmp_path, "focus_detr", extra=text))
    torch.manual_seed(0)
    return instantiate(cfg.model)


def batch_with(counts, sizes=None):
    """Images with ``counts[i]`` boxes each (classes 0..2); ``sizes[i]`` = (h, w), default 96x96."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i, n in enumerate(counts):
        h, w = sizes[i] if sizes else (96, 96)
        inst = Instances((h, w))
        xy = torch.rand(n, 2, generator=g) * (min(h, w) - 30)
        wh = 8 + torch.rand(n, 2, generator=g) * 20
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
        inst.gt_classes = torch.arange(n) % 3
        img = torch.randint(0, 255, (3, h, w), dtype=torch.uint8, generator=g)
        out.append({"image": img, "instances": inst})
    return out


def encoder_inputs(model, batch):
    """The flattened encoder inputs of ``batch``: ``(src, mask, pos, shapes, starts, ratios, shapes_list)``."""
    images, masks = model.preprocess_image(batch)
    srcs, level_masks, pos = model.multi_scale_features(images, masks)
    return flatten_multi_level(srcs, level_masks, pos, model.transformer.level_embed)


# ------------------------------------------------------------------------- configs
def test_r50_12ep_config_is_the_release_recipe():
    cfg = LazyConfig.load(os.path.join(CFG_DIR, "focus_detr_r50_4scale_12ep.py"))
    m = cfg.model
    t = m.transformer
    assert m.num_queries == 900 == t.two_stage_num_proposals and m.select_box_nums_for_evaluation == 300
    assert m.with_box_refine and not m.share_decoder_heads and m.inverse_sigmoid_eps == 1e-3
    assert (m.position_embedding.temperature, m.position_embedding.offset) == (10000, -0.5)
    assert m.backbone.freeze_at == 1 and m.neck.num_outs == 4 and t.alpha_init_range == 0.3
    assert t.encoder.keep_ratio == 0.5 and list(t.encoder.cascade_ratios) == [1.0, 0.8, 0.6, 0.6, 0.4, 0.2]
    assert t.encoder.encoder_layer.num_dual_tokens == 300
    assert t.decoder.look_forward_twice and not t.decoder.query_scale and t.decoder.norm.normalized_shape == 256
    for layer in (t.encoder.encoder_layer, t.decoder.decoder_layer):
        assert (layer.ffn_dim, layer.dropout, layer.num_heads, layer.num_points, layer.num_levels) == (2048, 0.0, 8, 4, 4)
    dn = m.denoising
    assert (dn.num_dn_queries, dn.label_noise_ratio, dn.box_noise_scale, dn.unknown_label) == (100, 0.5, 1.0, False)
    crit = m.criterion
    assert crit.weight_dict == {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_foreground": 1.5}
    assert not crit.enc_class_agnostic and list(crit.foreground_strides) == [8, 16, 32, 64]
    assert [list(r) for r in crit.foreground_ranges] == [[-1, 64], [64, 128], [128, 256], [256, math.inf]]
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.weight_decay == 1e-4 and cfg.optimizer.params.weight_decay_norm == 0
    assert dict(cfg.optimizer.params.lr_factor_func.factors) == {"backbone": 0.1}
    assert cfg.train.clip_grad.enabled and cfg.train.clip_grad.params.max_norm == 0.1
    assert cfg.dataloader.train.total_batch_size == 16 and cfg.dataloader.train.dataset.filter_empty
    assert cfg.train.max_iter == 90000 and list(cfg.lr_multiplier.scheduler.milestones) == [82500, 90000]


@pytest.mark.parametrize("name,depth,max_iter,milestones,values,warmup,temperature", [
    ("focus_detr_r50_4scale_24ep", 50, 180000, [150000, 180000], [1.0, 0.1], 0.0, 20),
    ("focus_detr_r50_4scale_36ep", 50, 270000, [210000, 250000, 270000], [1.0, 0.1, 0.01], 1000 / 270000, 20),
    ("focus_detr_r101_4scale_12ep", 101, 90000, [82500, 90000], [1.0, 0.1], 0.0, 10000),
    ("focus_detr_r101_4scale_24ep", 101, 180000, [150000, 180000], [1.0, 0.1], 0.0, 20),
    ("focus_detr_r101_4scale_36ep", 101, 270000, [150000, 270000], [1.0, 0.1], 0.0, 20),
])
def test_schedules_and_depths(name, depth, max_iter, milestones, values, warmup, temperature):
    cfg = LazyConfig.load(os.path.join(CFG_DIR, name + ".py"))
    assert cfg.model.backbone.depth == depth and cfg.train.max_iter == max_iter
    assert list(cfg.lr_multiplier.scheduler.milestones) == milestones
    assert list(cfg.lr_multiplier.scheduler["values"]) == values
    assert cfg.lr_multiplier.warmup_length == pytest.approx(warmup)
    assert cfg.model.position_embedding.temperature == temperature
    assert cfg.model.position_embedding.offset == (-0.5 if temperature == 10000 else 0.0)


def expected_release_r50_parameters(num_classes=80, levels=4, queries=900, d=256, ffn=2048, heads=8, points=4):
    """Trainable parameters of the release's Focus-DETR R50, summed from its module definitions
    (res2-res5 trainable, ChannelMapper, 6 dual-attention encoder layers, 6 decoder layers, the
    MaskPredictor and 3 alphas, 7 class / box heads, an 80-row label embedding)."""
    import torchvision

    tv = torchvision.models.resnet50()
    backbone = sum(p.numel() for n, p in tv.named_parameters()
                   if n.startswith(("layer1", "layer2", "layer3", "layer4")) and "bn" not in n and "downsample.1" not in n)
    lin = lambda i, o: i * o + o  # noqa: E731
    mlp3 = 2 * lin(d, d) + lin(d, 4)
    neck = sum(lin(c, d) + 2 * d for c in (512, 1024, 2048)) + (2048 * d * 9 + d + 2 * d)
    msda = lin(d, heads * levels * points * 2) + lin(d, heads * levels * points) + 2 * lin(d, d)
    mha = 3 * d * d + 3 * d + lin(d, d)
    layer = mha + msda + lin(d, ffn) + lin(ffn, d) + 3 * 2 * d  # encoder: norm2 + norms.0/1; decoder: norms.0-2
    selector = 2 * d + lin(d, d) + lin(d, d // 2) + lin(d // 2, d // 4) + lin(d // 4, 1) + (levels - 1)
    transformer = (12 * layer + 2 * d + lin(2 * d, d) + lin(d, d)  # decoder norm, ref_point_head
                   + levels * d + queries * d + lin(d, d) + 2 * d + selector)
    return backbone + neck + transformer + 7 * (lin(d, num_classes) + mlp3) + num_classes * d


def test_r50_parameter_count_is_the_releases():
    model = instantiate(LazyConfig.load(os.path.join(CFG_DIR, "models", "focus_detr_r50.py")).model)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == expected_release_r50_parameters() == 49_330_512
    # per-layer heads; the proposal heads are the extra 7th entries, and the dual attention ranks with it
    assert len({id(h) for h in model.class_embed}) == 7
    assert model.transformer.proposal_heads()[0] is model.class_embed[6]
    assert model.denoising.label_enc.weight.shape == (80, 256)
    assert model.transformer.foreground_selector.alpha.abs().max() <= 0.3


# ----------------------------------------------------------------- token selector
def release_selector_logits(selector, tokens, shapes):
    """The release's top-down scoring loop, written as there (NCHW maps, coarsest first)."""
    pred = selector.predictor

    def mask_predictor(x):  # MaskPredictor.forward
        z = pred.embed(x)
        z_local, z_global = torch.split(z, z.shape[-1] // 2, dim=-1)
        z_global = z_global.mean(dim=1, keepdim=True).expand(-1, z_local.shape[1], -1)
        return pred.mlp(torch.cat([z_local, z_global], dim=-1))

    bs, _, c = tokens.shape
    starts = [0] + list(torch.tensor([h * w for h, w in shapes]).cumsum(0).tolist())
    n = len(shapes)
    scores = []
    for i in range(n):
        lvl = n - 1 - i
        h, w = shapes[lvl]
        x = tokens[:, starts[lvl]:starts[lvl + 1]]
        if i > 0:
            up = F.interpolate(prev, (h, w), mode="bilinear", align_corners=True)
            nchw = x.reshape(bs, h, w, -1).permute(0, 3, 1, 2)
            x = x + (nchw * up * selector.alpha[i - 1]).permute(0, 2, 3, 1).reshape(bs, -1, c)
        prev = mask_predictor(x).reshape(bs, 1, h, w)
        scores.append(prev)
    return torch.cat([scores[n - 1 - i].view(bs, -1, 1) for i in range(n)], 1).squeeze(-1)


def test_selector_matches_the_release_formula():
    from d2detr.projects.focus_detr.modeling import ForegroundTokenSelector

    torch.manual_seed(0)
    selector = ForegroundTokenSelector(embed_dim=16, num_levels=4)
    with torch.no_grad():
        selector.alpha.copy_(torch.tensor([0.7, -0.5, 0.9]))  # large enough to matter
    shapes = [(6, 7), (3, 4), (2, 2), (1, 1)]
    tokens = torch.randn(2, sum(h * w for h, w in shapes), 16)
    torch.testing.assert_close(selector(tokens, shapes), release_selector_logits(selector, tokens, shapes))
    # the modulation is real: without it the finer levels score differently
    with torch.no_grad():
        selector.alpha.zero_()
    plain = selector(tokens, shapes)
    with torch.no_grad():
        selector.alpha.copy_(torch.tensor([0.7, -0.5, 0.9]))
    assert not torch.allclose(plain[:, :42], selector(tokens, shapes)[:, :42])
    torch.testing.assert_close(plain[:, -1:], selector(tokens, shapes)[:, -1:])  # the coarsest is not modulated


def test_foreground_labels_hand_computed():
    """Strides 8/16, ranges (-1, 8] and (8, inf): a 20x20 box at (4, 4)-(24, 24) on a 32x32 input."""
    from d2detr.projects.focus_detr.modeling import foreground_labels

    box = torch.tensor([[4.0, 4.0, 24.0, 24.0]])
    labels = foreground_labels(box, [(4, 4), (2, 2)], [8, 16], [(-1, 8), (8, math.inf)])
    # level 0 cell centres 4, 12, 20, 28: inside the box (strictly) are 12 and 20; there max(l,t,r,b)
    # is 12 (centre 12: l=8, r=12) or 16 -> beyond 8: no level-0 foreground; level 1 centres 8, 24:
    # only (8, 8) is strictly inside, reach max(4, 4, 16, 16) = 16 in (8, inf)
    assert labels.tolist() == [0.0] * 16 + [1.0, 0.0, 0.0, 0.0]
    # overlapping ranges label the same cells on both levels
    both = foreground_labels(box, [(4, 4), (2, 2)], [8, 16], [(-1, 16), (8, math.inf)])
    assert both[:16].view(4, 4)[1:3, 1:3].sum() == 4 and both[16] == 1
    # a point on the box border is outside (strictly inside only), no boxes: all background
    edge = foreground_labels(torch.tensor([[12.0, 12.0, 30.0, 30.0]]), [(4, 4)], [8], [(-1, math.inf)])
    assert edge.view(4, 4)[1, 1] == 0 and edge.view(4, 4)[2, 2] == 1
    assert foreground_labels(torch.zeros(0, 4), [(4, 4)], [8], [(-1, 64)]).sum() == 0
    with pytest.raises(ValueError, match="3 feature levels but 2 strides"):
        foreground_labels(box, [(4, 4), (2, 2), (1, 1)], [8, 16], [(-1, 8), (8, 64)])


def test_foreground_loss_is_the_per_image_normalised_focal_loss():
    from torchvision.ops import sigmoid_focal_loss

    from d2detr.projects.focus_detr.modeling import foreground_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 30)
    labels = torch.zeros(2, 30)
    labels[0, [3, 7, 11]] = 1  # image 1 has no foreground: divided by 1
    expected = torch.stack([sigmoid_focal_loss(logits[b], labels[b], 0.25, 2.0, "sum") / max(labels[b].sum(), 1)
                            for b in range(2)]).mean()
    torch.testing.assert_close(foreground_loss(logits, labels), expected)


# -------------------------------------------------------------- the sparse encoder
def test_kept_counts_rho_cascade_and_per_image():
    from d2detr.projects.focus_detr.modeling import FocusEncoder, FocusEncoderLayer

    enc = FocusEncoder(FocusEncoderLayer(embed_dim=8, num_heads=2, num_levels=1, ffn_dim=8), 6)
    mask = torch.zeros(2, 1000, dtype=torch.bool)
    mask[1, 301:] = True  # 301 valid tokens
    per_image, per_layer = enc.kept_counts(mask)
    assert per_image.tolist() == [501, 151]  # int(0.5 * valid) + 1
    assert per_layer.tolist() == [501, 400, 300, 300, 200, 100]  # float32(ratio) * 501, truncated
    tiny_mask = torch.zeros(1, 3, dtype=torch.bool)
    assert enc.kept_counts(tiny_mask)[1].tolist() == [2, 1, 1, 1, 1, 1]  # never 0
    with pytest.raises(ValueError, match="one ratio per encoder layer"):
        FocusEncoder(FocusEncoderLayer(embed_dim=8, num_heads=2, num_levels=1, ffn_dim=8), 2)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        FocusEncoder(FocusEncoderLayer(embed_dim=8, num_heads=2, num_levels=1, ffn_dim=8), 1, cascade_ratios=[0.0])


def test_sparse_encoder_equals_the_dense_layer_on_the_kept_tokens(tmp_path):
    """With the dual attention switched off, every kept token of a layer gets exactly what the
    dense deformable layer (all tokens as queries, the neck features as values) gives it; the
    others keep their values; a padded image writes back only its own count."""
    from d2detr.modeling.deformable_transformer import DeformableTransformerEncoderLayer

    model = tiny(tmp_path, **{"transformer.encoder.num_layers": 2, "transformer.encoder.cascade_ratios": [1.0, 0.5]}).eval()
    t = model.transformer
    for layer in t.encoder.layers:
        layer.dual_attention = lambda q, p, s, h: (q, None)
    src, mask, pos, shapes, starts, ratios, shapes_list = encoder_inputs(
        model, batch_with([1, 1], sizes=[(96, 96), (64, 96)]))
    with torch.no_grad():
        memory, out = t.encode(src, shapes, starts, ratios, pos, mask, shapes_list)
        scores = out["foreground_logits"].masked_fill(mask, out["foreground_logits"].min())
        per_image, per_layer = t.encoder.kept_counts(mask)
        ref = t.encoder.get_reference_points(shapes_list, ratios)
        expected = src
        for i, layer in enumerate(t.encoder.layers):
            dense = DeformableTransformerEncoderLayer.forward_ffn(layer, layer.norm1(expected + layer.self_attn(
                expected + pos, ref, src, shapes, starts, mask)))
            index = scores.topk(int(per_layer[i]), dim=1)[1]
            for b in range(2):
                own = index[b, :int(per_image[b])]
                expected = expected.clone()
                expected[b, own] = dense[b, own]
    torch.testing.assert_close(memory, expected, atol=1e-5, rtol=1e-5)
    assert per_image[1] < per_layer[0]  # the padded image really wrote back fewer
    untouched = torch.ones(2, src.shape[1], dtype=torch.bool)
    for b in range(2):
        untouched[b, out["kept_token_index"][0][b, :int(per_image[b])]] = False
    assert torch.equal(memory[untouched], src[untouched])
    assert not torch.isclose(memory[~untouched], src[~untouched]).all()


def test_dual_attention_reattends_the_top_tokens_by_class_times_foreground_score():
    from d2detr.projects.focus_detr.modeling import FocusEncoderLayer

    torch.manual_seed(0)
    layer = FocusEncoderLayer(embed_dim=8, num_heads=2, num_levels=1, ffn_dim=8, dropout=0.0, num_dual_tokens=3).eval()
    head = torch.nn.Linear(8, 4)
    q, p = torch.randn(1, 10, 8), torch.randn(1, 10, 8)
    fg = torch.randn(1, 10)
    with torch.no_grad():
        out, index = layer.dual_attention(q, p, fg, head)
        best = (head(q).max(-1)[0] * fg).topk(3, dim=1)[1]
        assert torch.equal(index, best)
        sel, pos = q[:, best[0]], p[:, best[0]]
        attended = layer.dual_attn(sel + pos, sel + pos, sel)[0]
        torch.testing.assert_close(out[:, best[0]], layer.dual_norm(sel + attended))
        rest = torch.ones(10, dtype=torch.bool)
        rest[best[0]] = False
        assert torch.equal(out[:, rest], q[:, rest])
        # fewer tokens than num_dual_tokens: all of them, no failure (the release's top-300 crash)
        out2, index2 = layer.dual_attention(q[:, :2], p[:, :2], fg[:, :2], head)
        assert index2.shape == (1, 2) and out2.shape == (1, 2, 8)


def test_sparse_work_is_skipped_profile_and_flops(tmp_path):
    """The deformable op runs with the kept tokens as queries (profile), and fvcore's encoder FLOPs
    are the hand count of that sparse work."""
    from d2detr.export.analysis import analyze_model

    model = tiny(tmp_path, **{"transformer.encoder.num_layers": 2, "transformer.encoder.cascade_ratios": [1.0, 0.5]}).eval()
    image = torch.randint(0, 255, (3, 128, 96), dtype=torch.uint8)
    S = 16 * 12 + 8 * 6 + 4 * 3  # 252 tokens, none padded
    kept = [127, 63]  # int(0.5 * 252) + 1, then int(0.5 * 127)
    with torch.no_grad(), torch.profiler.profile(record_shapes=True) as prof:
        model([{"image": image}])
    queries = [e.input_shapes[3][1] for e in prof.events() if e.name == "d2detr::ms_deform_attn"]
    assert queries[:2] == kept  # the encoder's two layers, then the decoder's 12 queries
    assert queries[2:] == [12, 12]

    stats = analyze_model(model, image, ["transformer.encoder"])
    d, ffn, M, L, P, k_dual = 64, 64, 4, 3, 4, 8
    lin = lambda n, i, o: n * i * o  # noqa: E731 (multiply-adds)
    per_layer = 0
    for k in kept:
        per_layer += lin(S, d, d)  # value_proj: every token, every layer (the values are the neck features)
        per_layer += lin(k, d, M * L * P * 2) + lin(k, d, M * L * P) + lin(k, d, d)  # offsets, weights, output
        per_layer += k * M * (d // M) * L * P * 5  # the op itself
        per_layer += lin(k, d, ffn) + lin(k, ffn, d)
        per_layer += 5 * k * d * 2  # the two LayerNorms (fvcore: 5 per element)
        per_layer += lin(k_dual, d, 3 * d) + lin(k_dual, d, d) + 2 * k_dual * k_dual * d + 5 * k_dual * d  # dual attention
    assert stats["submodules"]["transformer.encoder"]["flops"] == per_layer


def test_images_with_fewer_tokens_than_any_k(tmp_path):
    """A 32x32 image has 4x4 + 2x2 + 1 = 21 tokens: fewer than the 900 queries, the 300 dual
    tokens and the padded batch's k; training and inference work, also next to a large image."""
    model = tiny(tmp_path, num_queries=900, **{"transformer.encoder.encoder_layer.num_dual_tokens": 300})
    model.train()
    losses = model(batch_with([1, 2], sizes=[(32, 32), (96, 128)]))
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)}])
    assert len(out[0]["instances"]) == 10


def test_losses_with_zero_one_and_many_objects_reach_every_parameter(tmp_path):
    model = tiny(tmp_path, **{"denoising.num_dn_queries": 4})
    model.train()
    keys = None
    for counts in ([0, 0], [1, 0], [6, 2]):
        losses = model(batch_with(counts))
        assert all(torch.isfinite(v) for v in losses.values())
        keys = keys or set(losses)
        assert set(losses) == keys and {"loss_foreground", "loss_class_dn", "loss_class_enc"} <= keys
        sum(losses.values()).backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, missing
        model.zero_grad()


def test_foreground_loss_in_the_detector_uses_each_images_size(tmp_path):
    """``loss_foreground`` = 1.5 x the focal loss of the selector's logits against the labels of
    the boxes in each image's own pixels (padded batch: the smaller image keeps its coordinates)."""
    from d2detr.projects.focus_detr.modeling import foreground_labels, foreground_loss

    model = tiny(tmp_path)
    batch = batch_with([2, 1], sizes=[(96, 128), (64, 64)])
    images, masks = model.preprocess_image(batch)
    targets = model.prepare_targets([x["instances"] for x in batch])
    assert targets[1]["image_size"].tolist() == [64.0, 64.0]
    model.train()
    out = model.forward_features(images, masks, targets=targets)
    shapes = [(12, 16), (6, 8), (3, 4)]
    ranges = [(-1, 64), (64, 128), (128, math.inf)]
    labels = torch.stack([foreground_labels(x["instances"].gt_boxes.tensor, shapes, [8, 16, 32], ranges) for x in batch])
    assert labels.sum() > 0
    losses = model.criterion(out, targets)
    torch.testing.assert_close(losses["loss_foreground"], 1.5 * foreground_loss(out["foreground_logits"], labels))
    with pytest.raises(KeyError, match="image_size"):
        model.criterion(out, [{k: v for k, v in t.items() if k != "image_size"} for t in targets])


def test_trace_matches_eager_on_another_size(tmp_path):
    """(torch.export with dynamic size, and both files in a fresh process: tests/test_export.py.)"""
    assert_trace_matches_eager(tiny(tmp_path))


def test_configuration_errors_are_clear(tmp_path):
    from d2detr.modeling.deformable_transformer import DeformableTransformerEncoder, DeformableTransformerEncoderLayer
    from d2detr.projects.focus_detr.modeling import FocusDETR, FocusDetrTransformer

    model = tiny(tmp_path)
    plain = DeformableTransformerEncoder(DeformableTransformerEncoderLayer(64, 4, 3, 4, 64), 1)
    with pytest.raises(TypeError, match="needs a FocusEncoder"):
        FocusDetrTransformer(plain, model.transformer.decoder, 64, 3)
    with pytest.raises(TypeError, match="needs FocusEncoderLayer"):
        type(model.transformer.encoder)(DeformableTransformerEncoderLayer(64, 4, 3, 4, 64), 1, cascade_ratios=[1.0])
    cfg = LazyConfig.load(write_tiny_config(tmp_path, "dino"))
    dino_transformer = instantiate(cfg.model.transformer)
    with pytest.raises(TypeError, match="needs a FocusDetrTransformer"):
        FocusDETR(backbone=model.backbone, neck=model.neck, position_embedding=model.position_embedding,
                  transformer=dino_transformer, num_classes=3, num_queries=12, embed_dim=64)


# --------------------------------------------------------- official checkpoint layout
def release_state_dict(num_classes=80, levels=4, queries=900, d=256, ffn=2048, heads=8, points=4, seed=0):
    """A state dict with the release's key names and shapes, written from its module definitions
    (detectron2 ResNet, detrex ChannelMapper / MultiheadAttention / MultiScaleDeformableAttention /
    FFN, ``FOCUS_DETRTransformer``, ``MaskPredictor``, ``FOCUS_DETR``)."""
    from detectron2.modeling.backbone import BasicStem, ResNet

    g = torch.Generator().manual_seed(seed)
    backbone = ResNet(BasicStem(3, 64, norm="FrozenBN"),
                      ResNet.make_default_stages(50, stride_in_1x1=False, norm="FrozenBN"),
                      out_features=["res3", "res4", "res5"], freeze_at=1)
    shapes = {"backbone." + k: v.shape for k, v in backbone.state_dict().items()}
    for l, c in enumerate((512, 1024, 2048)):
        shapes.update({f"neck.convs.{l}.conv.weight": (d, c, 1, 1), f"neck.convs.{l}.conv.bias": (d,),
                       f"neck.convs.{l}.norm.weight": (d,), f"neck.convs.{l}.norm.bias": (d,)})
    shapes.update({"neck.extra_convs.0.conv.weight": (d, 2048, 3, 3), "neck.extra_convs.0.conv.bias": (d,),
                   "neck.extra_convs.0.norm.weight": (d,), "neck.extra_convs.0.norm.bias": (d,)})

    def lin(name, i, o):
        shapes[name + ".weight"], shapes[name + ".bias"] = (o, i), (o,)

    def norm(name):
        shapes[name + ".weight"] = shapes[name + ".bias"] = (d,)

    def layer(p, num_norms):
        shapes[p + ".attentions.0.attn.in_proj_weight"], shapes[p + ".attentions.0.attn.in_proj_bias"] = (3 * d, d), (3 * d,)
        lin(p + ".attentions.0.attn.out_proj", d, d)
        lin(p + ".attentions.1.sampling_offsets", d, heads * levels * points * 2)
        lin(p + ".attentions.1.attention_weights", d, heads * levels * points)
        lin(p + ".attentions.1.value_proj", d, d), lin(p + ".attentions.1.output_proj", d, d)
        lin(p + ".ffns.0.layers.0.0", d, ffn), lin(p + ".ffns.0.layers.1", ffn, d)
        for n in range(num_norms):
            norm(f"{p}.norms.{n}")

    for i in range(6):
        layer(f"transformer.encoder.layers.{i}", 2)
        norm(f"transformer.encoder.layers.{i}.norm2")
        layer(f"transformer.decoder.layers.{i}", 3)
    lin("transformer.decoder.ref_point_head.layers.0", 2 * d, d), lin("transformer.decoder.ref_point_head.layers.1", d, d)
    norm("transformer.decoder.norm")
    shapes["transformer.level_embeds"] = (levels, d)
    shapes["transformer.tgt_embed.weight"] = (queries, d)
    shapes["transformer.alpha"] = (levels - 1,)
    lin("transformer.enc_output", d, d), norm("transformer.enc_output_norm")
    norm("transformer.enc_mask_predictor.layer1.0"), lin("transformer.enc_mask_predictor.layer1.1", d, d)
    lin("transformer.enc_mask_predictor.layer2.0", d, d // 2), lin("transformer.enc_mask_predictor.layer2.2", d // 2, d // 4)
    lin("transformer.enc_mask_predictor.layer2.4", d // 4, 1)
    for i in range(7):
        for head in ("class_embed", "transformer.decoder.class_embed"):
            lin(f"{head}.{i}", d, num_classes)
        for head in ("bbox_embed", "transformer.decoder.bbox_embed"):
            lin(f"{head}.{i}.layers.0", d, d), lin(f"{head}.{i}.layers.1", d, d), lin(f"{head}.{i}.layers.2", d, 4)
    shapes["label_enc.weight"] = (num_classes, d)
    sd = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    for k in sd:
        if k.endswith("running_var"):
            sd[k] = sd[k].abs() + 0.5
    # the decoder's views of the heads and the encoder's view of the proposal class head are the same tensors
    for k in list(sd):
        if k.startswith(("class_embed.", "bbox_embed.")):
            sd["transformer.decoder." + k] = sd[k]
        if k.startswith("class_embed.6."):
            for i in range(6):
                sd[f"transformer.encoder.enhance_MCSP.{i}." + k.split(".")[-1]] = sd[k]
    return sd


def test_release_checkpoint_converts_one_to_one():
    from d2detr.checkpoint import convert_hf_checkpoint, detect_model_type

    release = release_state_dict()
    assert detect_model_type(release) == "focus_detr_official"
    state, overrides = convert_hf_checkpoint(release, {}, model_type="focus_detr_official")
    assert overrides == {"model.num_classes": 80, "model.num_queries": 900, "model.backbone.depth": 50,
                         "model.transformer.encoder.num_layers": 6, "model.transformer.decoder.num_layers": 6}
    cfg = LazyConfig.load(os.path.join(CFG_DIR, "models", "focus_detr_r50.py"))
    apply_overrides(cfg, overrides)
    model = instantiate(cfg.model)
    model.load_state_dict(state, strict=True)  # every tensor has its place, nothing is left over
    own = {k for k in release if not k.startswith("transformer.encoder.enhance_MCSP.")}
    assert len(state) == len(own) == len(model.state_dict())
    t = model.transformer
    torch.testing.assert_close(t.foreground_selector.alpha, release["transformer.alpha"])
    torch.testing.assert_close(t.foreground_selector.predictor.mlp[4].weight, release["transformer.enc_mask_predictor.layer2.4.weight"])
    layer = t.encoder.layers[3]
    torch.testing.assert_close(layer.dual_attn.in_proj_weight, release["transformer.encoder.layers.3.attentions.0.attn.in_proj_weight"])
    torch.testing.assert_close(layer.self_attn.value_proj.weight, release["transformer.encoder.layers.3.attentions.1.value_proj.weight"])
    torch.testing.assert_close(layer.dual_norm.bias, release["transformer.encoder.layers.3.norm2.bias"])
    torch.testing.assert_close(layer.norm2.weight, release["transformer.encoder.layers.3.norms.1.weight"])
    dec = t.decoder.layers[5]
    torch.testing.assert_close(dec.norm2.weight, release["transformer.decoder.layers.5.norms.0.weight"])
    torch.testing.assert_close(dec.norm1.weight, release["transformer.decoder.layers.5.norms.1.weight"])
    torch.testing.assert_close(dec.linear2.weight, release["transformer.decoder.layers.5.ffns.0.layers.1.weight"])
    torch.testing.assert_close(model.neck.input_proj[3][0].weight, release["neck.extra_convs.0.conv.weight"])
    torch.testing.assert_close(model.denoising.label_enc.weight, release["label_enc.weight"])
    torch.testing.assert_close(t.level_embed, release["transformer.level_embeds"])
    # a checkpoint whose encoder view is not the proposal head is refused
    broken = dict(release)
    broken["transformer.encoder.enhance_MCSP.2.bias"] = torch.zeros(80)
    with pytest.raises(ValueError, match="not the proposal class head"):
        convert_hf_checkpoint(broken, {}, model_type="focus_detr_official")


# ----------------------------------------------------------------------- pictures
def test_visualize_kept_tokens_draws_the_kept_tokens_per_level(tmp_path):
    """tools/visualize_kept_tokens.py: one panel per level plus the probability map; the kept
    cells are the top int(0.5 * 252) + 1 = 127 tokens by foreground score, spread over the levels."""
    import importlib.util

    import cv2
    import numpy as np

    from tiny_configs import build_tiny, random_image

    config = write_tiny_config(tmp_path, "focus_detr")
    model, weights = build_tiny(config)
    image = random_image(96, 128, seed=4)
    path = str(tmp_path / "trees.png")
    cv2.imwrite(path, image.permute(1, 2, 0).numpy()[:, :, ::-1].copy())
    spec = importlib.util.spec_from_file_location("visualize_kept_tokens", os.path.join(REPO, "tools", "visualize_kept_tokens.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = tool.get_parser().parse_args(["--config-file", config, "--input", path, "--output", str(tmp_path / "out"),
                                         "--min-size", "0", "--save-data", f"train.init_checkpoint={weights}"])
    (png,) = tool.main(args)
    assert cv2.imread(png).shape == (96, 128 * 4, 3)  # 3 levels + the probability map
    data = np.load(png[:-4] + ".npz")
    assert data["shapes"].tolist() == [[12, 16], [6, 8], [3, 4]]
    kept = np.concatenate([data[f"kept_{l}"].reshape(-1) for l in range(3)])
    probs = np.concatenate([data[f"probability_{l}"].reshape(-1) for l in range(3)])
    assert kept.sum() == 127
    assert probs[kept].min() >= probs[~kept].max()  # the best-scored tokens, whatever their level
    with pytest.raises(ValueError, match="encoder has 1 layers"):
        tool.kept_token_maps(model.eval(), image, layer=3)
