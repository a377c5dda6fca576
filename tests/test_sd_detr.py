"""SD-DETR (projects/sd_detr): parameter counts of the ablation flags, configs, every component's
shapes and gradients (mini-detector, RoIAlign, discriminative points, decoupled decoder), the
task-alignment target and loss against hand-computed cases, repeated positives, training and
inference of every ablation row, and the classification / localisation attention pictures."""
import math
import os

import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate

from helpers import TINY_SINGLE_SCALE, build_model, expected_loss_keys, synthetic_batch, training_step

from d2detr.checkpoint import apply_overrides
from d2detr.modeling.conditional_transformer import ConditionalDecoderLayer, record_cross_attention
from d2detr.modeling.criterion import SetCriterion
from d2detr.modeling.matcher import HungarianMatcher
from d2detr.projects.sd_detr.modeling import (
    DiscriminativePoints,
    MiniDetector,
    SDDecoderLayer,
    SDDETRCriterion,
    SDDetrTransformer,
    roi_align,
    task_alignment_targets,
)
from d2detr.projects.sd_detr.modeling.query_generation import anchors_to_feature_boxes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG_DIR = os.path.join(ROOT, "projects/sd_detr/configs")
MODEL_CFG = os.path.join(CFG_DIR, "models/sd_detr_r50.py")
TINY = {**TINY_SINGLE_SCALE, "model.num_queries": 12}

NO_TAQ = {"model.transformer.task_aware_queries": False}
NO_ALIGN = {"model.criterion.alignment_loss": False}
#: The paper's Table 2 rows and Table 3's alternative as overrides of the one model config.
ROWS = {
    "baseline": {"model.transformer.decoupling": "none", **NO_TAQ, **NO_ALIGN},
    "dfl": {**NO_TAQ, **NO_ALIGN},
    "taq": {**NO_ALIGN},
    "sd_detr": {},
    "full_copy": {"model.transformer.decoupling": "full", **NO_TAQ, **NO_ALIGN},
}
#: Parameters of SD-DETR R50 at 91 classes per row (total, trainable); the project README lists them.
PARAMS_R50_91 = {
    "baseline": (43_671_588, 43_449_188),
    "dfl": (52_549_412, 52_327_012),
    "taq": (54_993_348, 54_770_948),
    "sd_detr": (54_993_348, 54_770_948),
    "full_copy": (54_920_996, 54_698_596),
}


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(row="sd_detr", **kwargs):
    torch.manual_seed(0)
    return build_model(MODEL_CFG, {**TINY, **ROWS[row], **kwargs})


def count(module, trainable=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


# ------------------------------------------------------------------------- size and configs
def test_ablation_flags_give_the_documented_parameter_counts():
    """R50 at 91 classes: the full model once, every other row by swapping only the transformer
    (backbone, projection and heads do not depend on the flags)."""
    cfg = LazyConfig.load(MODEL_CFG)
    apply_overrides(cfg, {"model.num_classes": 91})
    model = instantiate(cfg.model)
    assert (count(model), count(model, True)) == PARAMS_R50_91["sd_detr"]
    rest = count(model) - count(model.transformer)
    for row, overrides in ROWS.items():
        c = LazyConfig.load(MODEL_CFG)
        apply_overrides(c, overrides)
        transformer = instantiate(c.model.transformer)
        assert rest + count(transformer) == PARAMS_R50_91[row][0], row
        assert PARAMS_R50_91[row][0] - PARAMS_R50_91[row][1] == 222_400  # frozen stem + res2
    t = model.transformer
    assert t.d_model == 256 and t.nhead == 8 and len(t.encoder.layers) == 6 and len(t.decoder.layers) == 6
    assert t.decoupling == "cross_attention" and t.task_aware_queries
    assert set(t.decoder.layers[0].parts) == {"shared", "cls", "loc"}
    assert t.decoder.layers[0].parts["shared"].cross_attn is None and t.decoder.layers[0].parts["cls"].self_attn is None
    assert all(p.ca_qpos_proj is None for l in t.decoder.layers[1:] for p in l.parts.values() if p.with_cross_attention)
    assert set(t.point_heads) == {"cls", "loc"} and t.point_heads["cls"].num_points == 8
    c = model.criterion
    assert c.alignment_loss and (c.alignment_alpha, c.alignment_beta, c.alignment_gamma) == (1.0, 6.0, 2.0)
    assert c.positive_repeats == 2 and c.weight_dict == {"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    assert (c.matcher.cost_class, c.matcher.cost_bbox, c.matcher.cost_giou) == (2.0, 5.0, 2.0)
    assert model.num_queries == 300 and model.select_box_nums_for_evaluation == 100
    torch.testing.assert_close(model.class_embed.bias.sigmoid(), torch.full((91,), 0.01))


@pytest.mark.parametrize("name,depth", [("sd_detr_r50_50ep", 50), ("sd_detr_r101_50ep", 101)])
def test_configs_carry_conditional_detrs_recipe(name, depth):
    cfg = LazyConfig.load(os.path.join(CFG_DIR, name + ".py"))
    assert cfg.model.backbone.depth == depth and cfg.model.num_queries == 300 and cfg.model.num_classes == 80
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.weight_decay == 1e-4
    assert dict(cfg.optimizer.params.lr_factor_func.factors) == {"backbone": 0.1}
    assert cfg.train.clip_grad.enabled and cfg.train.clip_grad.params.max_norm == 0.1
    assert cfg.dataloader.train.total_batch_size == 16
    assert cfg.train.max_iter == 50 * -(-118287 // 16)
    sched = instantiate(cfg.lr_multiplier)
    assert sched(39.5 / 50) == 1.0 and sched(40.5 / 50) == pytest.approx(0.1)
    assert name in cfg.train.output_dir


def test_neon_trees_rows_set_the_flags_of_each_ablation_row():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cc", os.path.join(ROOT, "tools", "compare_convergence.py"))
    cc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cc)
    expected = {"sd_detr_baseline": ("none", False, False), "sd_detr_dfl": ("cross_attention", False, False),
                "sd_detr_taq": ("cross_attention", True, False), "sd_detr": ("cross_attention", True, True)}
    for method, flags in expected.items():
        cfg = LazyConfig.apply_overrides(LazyConfig.load(os.path.join(ROOT, cc.METHODS[method][0])),
                                         cc.METHOD_OVERRIDES.get(method, []))
        t = cfg.model.transformer
        assert (t.decoupling, t.task_aware_queries, cfg.model.criterion.alignment_loss) == flags, method
        assert t.d_model == 128 and cfg.model.num_queries == 100


def test_bad_flags_are_clear_errors():
    with pytest.raises(ValueError, match="task_aware_queries.*decoupling"):
        SDDetrTransformer(d_model=32, nhead=4, decoupling="none", task_aware_queries=True)
    with pytest.raises(ValueError, match="decoupling must be one of"):
        SDDetrTransformer(d_model=32, nhead=4, decoupling="split")
    with pytest.raises(ValueError, match="positive_repeats"):
        SDDETRCriterion(1, HungarianMatcher(use_focal=True), {"loss_class": 1}, use_focal=True, positive_repeats=0)
    with pytest.raises(ValueError, match="use_focal"):
        SDDETRCriterion(1, HungarianMatcher(), {"loss_class": 1}, use_focal=False)
    with pytest.raises(ValueError, match="boxes"):
        roi_align(torch.zeros(1, 4, 5, 5), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="num_points"):
        DiscriminativePoints(16, num_points=0)
    with pytest.raises(ValueError, match="self-attention, cross-attention"):
        ConditionalDecoderLayer(16, 2, with_self_attention=False, with_cross_attention=False)


# ------------------------------------------------------------------------------ components
def test_roi_align_matches_torchvision_and_follows_the_valid_region():
    torchvision_ops = pytest.importorskip("torchvision.ops")
    torch.manual_seed(0)
    feat = torch.randn(2, 3, 6, 9, dtype=torch.float64)
    xy0 = torch.rand(2, 5, 2, dtype=torch.float64) * torch.tensor([6.0, 4.0], dtype=torch.float64)
    wh = torch.rand(2, 5, 2, dtype=torch.float64) * 2 + 0.3
    boxes = torch.cat([xy0, xy0 + wh], -1)  # inside the 6x9 map
    ours = roi_align(feat, boxes, output_size=7, sampling_ratio=2)
    ref = torchvision_ops.roi_align(feat, list(boxes), output_size=7, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    assert ours.shape == (2, 5, 3, 7, 7)
    torch.testing.assert_close(ours.reshape(10, 3, 7, 7), ref, atol=1e-10, rtol=0)
    # normalised anchors of an image whose feature map is padded: cells of its valid part
    mask = torch.zeros(1, 4, 6, dtype=torch.bool)
    mask[:, 3:, :] = True
    mask[:, :, 4:] = True  # valid 3 x 4 cells
    cells = anchors_to_feature_boxes(torch.tensor([[[0.5, 0.5, 1.0, 1.0], [0.25, 0.5, 0.5, 0.2]]]), mask)
    torch.testing.assert_close(cells, torch.tensor([[[0.0, 0.0, 4.0, 3.0], [0.0, 1.2, 2.0, 1.8]]]))


def test_mini_detector_anchors_are_top_scoring_valid_proposals_without_gradient():
    torch.manual_seed(0)
    md = MiniDetector(d_model=16, anchor_scale=0.2)
    memory = torch.randn(2, 6, 16, requires_grad=True)  # a 2 x 3 map
    mask = torch.zeros(2, 2, 3, dtype=torch.bool)
    mask[1, :, 2] = True  # image 1: last column padded, 2 x 2 valid cells
    anchors, logits, boxes = md(memory, mask.flatten(1), (2, 3), k=4)
    assert anchors.shape == (2, 4, 4) and logits.shape == (2, 6, 1) and boxes.shape == (2, 6, 4)
    assert not anchors.requires_grad and logits.requires_grad
    # the box head starts at zero: anchors are the chosen tokens' grid proposals, centred on the
    # cells (normalised by the valid size), width = height = anchor_scale
    score = logits[..., 0].detach()
    score[1, [2, 5]] = -math.inf
    top = score.topk(4, dim=1).indices
    for b, valid_w in ((0, 3), (1, 2)):
        x, y = top[b] % 3, top[b] // 3
        centres = torch.stack([(x + 0.5) / valid_w, (y + 0.5) / 2], -1)
        torch.testing.assert_close(anchors[b, :, :2], centres, atol=1e-6, rtol=0)
    torch.testing.assert_close(anchors[..., 2:], torch.full((2, 4, 2), 0.2), atol=1e-6, rtol=0)
    (logits.sum() + boxes.sum()).backward()
    assert memory.grad.abs().sum() > 0


def test_discriminative_points_average_the_features_at_their_points():
    """Offsets set by the last bias (weights zero) put two points exactly on RoI cells (1, 2) and
    (5, 4): the content is the mean of those two cells, and only they receive its gradient."""
    torch.manual_seed(0)
    head = DiscriminativePoints(d_model=8, num_points=2, roi_size=7)
    centre = lambda i: (2 * i + 1) / 7 - 1  # grid_sample(align_corners=False) coordinate of cell i
    with torch.no_grad():
        head.point_mlp[-1].weight.zero_()
        head.point_mlp[-1].bias.copy_(torch.tensor([centre(1), centre(2), centre(5), centre(4)]).atanh())
    roi = torch.randn(2, 3, 8, 7, 7, requires_grad=True)
    content, offsets = head(roi)
    assert content.shape == (2, 3, 8) and offsets.shape == (2, 3, 2, 2)
    assert (offsets.abs() < 1).all()
    torch.testing.assert_close(content, (roi[..., 2, 1] + roi[..., 4, 5]) / 2, atol=1e-6, rtol=0)
    content.sum().backward()
    expected = torch.zeros(7, 7)
    expected[2, 1] = expected[4, 5] = 0.5
    torch.testing.assert_close(roi.grad, expected.expand_as(roi), atol=1e-6, rtol=0)
    assert head.point_mlp[-1].weight.grad.abs().sum() > 0  # the points learn from the content


@pytest.mark.parametrize("decoupling", ["none", "cross_attention", "full"])
def test_decoder_layer_shares_only_what_its_mode_shares(decoupling):
    """DFL: the classification output depends on the localisation queries (shared self-attention);
    full copies: it does not; none: exactly Conditional DETR's layer."""
    torch.manual_seed(0)
    layer = SDDecoderLayer(16, 2, 32, 0.0, "relu", decoupling).eval()
    tgt_cls, tgt_loc, pos_cls, pos_loc, sine_cls, sine_loc = torch.randn(6, 2, 5, 16).unbind(0)
    memory, pos = torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    args = (pos_cls, pos_loc, sine_cls, sine_loc, memory, pos, None, True)
    out_cls, out_loc = layer(tgt_cls, tgt_loc, *args)
    assert out_cls.shape == out_loc.shape == (2, 5, 16)
    moved_cls, _ = layer(tgt_cls, tgt_loc + 1.0, *args)
    if decoupling == "none":
        ref = ConditionalDecoderLayer(16, 2, 32, 0.0, "relu").eval()
        ref.load_state_dict(layer.parts["shared"].state_dict())
        torch.testing.assert_close(out_cls, ref(tgt_cls, memory, pos, pos_cls, sine_cls, is_first=True))
        assert out_loc is out_cls
    elif decoupling == "cross_attention":
        assert (moved_cls - out_cls).abs().max() > 1e-3
        assert count(layer.parts["shared"]) == 6 * (16 * 16 + 16) + 2 * 16  # 5 projections, out_proj, norm1
    else:
        torch.testing.assert_close(moved_cls, out_cls)


# ------------------------------------------------------------------------- the alignment loss
def test_alignment_targets_hand_computed():
    """t = s^α u^β (α 1, β 6) and TOOD's per-ground-truth normalisation t / max t · max u."""
    s = torch.tensor([0.5, 0.8, 0.2], dtype=torch.float64)
    u = torch.tensor([0.9, 0.6, 0.7], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1])
    raw = task_alignment_targets(s, u, groups, 1.0, 6.0, normalize=False)
    torch.testing.assert_close(raw, torch.tensor([0.5 * 0.531441, 0.8 * 0.046656, 0.2 * 0.117649], dtype=torch.float64))
    norm = task_alignment_targets(s, u, groups, 1.0, 6.0, normalize=True)
    second = (0.8 * 0.046656) / (0.5 * 0.531441) * 0.9
    torch.testing.assert_close(norm, torch.tensor([0.9, second, 0.7], dtype=torch.float64), rtol=1e-6, atol=0)  # eps 1e-8
    with pytest.raises(ValueError):
        task_alignment_targets(s, u[:2], groups)


def _criterion(alignment_loss=True, normalize=True, num_classes=1, **kwargs):
    return SDDETRCriterion(
        num_classes, HungarianMatcher(2.0, 5.0, 2.0, use_focal=True),
        {"loss_class": 1.0, "loss_bbox": 1.0, "loss_giou": 1.0}, use_focal=True,
        alignment_loss=alignment_loss, normalize_alignment=normalize, **kwargs,
    )


@pytest.mark.parametrize("normalize", [True, False])
def test_alignment_loss_hand_computed(normalize):
    """Two queries, one ground truth (0.5, 0.5, 0.4, 0.4). Query 0: box (0.5, 0.5, 0.4, 0.2),
    IoU 0.5, logit 0 (s = 0.5) -> matched; t = 0.5 · 0.5^6, normalised to the IoU 0.5. Query 1: far
    away, logit -1, a negative. Loss = Σ |y - p|^2 BCE(p, y) over both, / 1 positive."""
    outputs = {"pred_logits": torch.tensor([[[0.0], [-1.0]]]),
               "pred_boxes": torch.tensor([[[0.5, 0.5, 0.4, 0.2], [0.1, 0.1, 0.1, 0.1]]])}
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    losses = _criterion(normalize=normalize)(outputs, targets)
    sig = 1 / (1 + math.exp(1.0))
    negative = sig ** 2 * math.log(1 + math.exp(-1.0))
    if normalize:
        positive = 0.0  # y = 0.5 = p
    else:
        y = 0.5 * 0.5 ** 6
        positive = (0.5 - y) ** 2 * math.log(2.0)  # BCE at logit 0 is log 2 for any y
    assert losses["loss_class"].item() == pytest.approx(positive + negative, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(0.2, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(0.5, rel=1e-5)
    # an image without objects: both queries are negatives, p^2 BCE(p, 0), over max(1, 0 positives)
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    losses = _criterion(normalize=normalize)(outputs, empty)
    assert losses["loss_class"].item() == pytest.approx(0.25 * math.log(2.0) + negative, rel=1e-5)
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0


def test_auxiliary_layers_repeat_each_ground_truth():
    torch.manual_seed(0)
    crit = _criterion(num_classes=3, positive_repeats=2)
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]

    def outputs(q):
        return {"pred_logits": torch.randn(2, q, 3), "pred_boxes": torch.rand(2, q, 4) * 0.5 + 0.25}

    indices = crit.match_repeated(outputs(8), targets, 2)
    for (src, tgt), n in zip(indices, (2, 1)):
        assert len(src) == 2 * n and len(set(src.tolist())) == 2 * n  # k distinct queries per ground truth
        assert sorted(tgt.tolist()) == sorted(list(range(n)) * 2)
    # the cap k·n <= Q/2 (Align-DETR): 6 queries, 2 ground truths -> one copy
    assert [len(s) for s, _ in crit.match_repeated(outputs(6), targets, 2)] == [2, 2]

    out = outputs(8)
    out["aux_outputs"] = [outputs(8)]
    losses = crit(out, targets)
    assert set(losses) == {"loss_class", "loss_bbox", "loss_giou", "loss_class_0", "loss_bbox_0", "loss_giou_0"}
    # the auxiliary set's box loss is averaged over its 6 positives, the last layer's over 3
    aux, (idx0, idx1) = out["aux_outputs"][0], crit.match_repeated(out["aux_outputs"][0], targets, 2)
    l1 = sum((aux["pred_boxes"][b, s] - t["boxes"][j]).abs().sum() for b, (s, j), t in
             zip((0, 1), (idx0, idx1), targets))
    assert losses["loss_bbox_0"].item() == pytest.approx(l1.item() / 6, rel=1e-5)


def test_without_alignment_loss_it_is_conditional_detrs_set_criterion():
    torch.manual_seed(0)
    out = {"pred_logits": torch.randn(2, 6, 3), "pred_boxes": torch.rand(2, 6, 4) * 0.5 + 0.25,
           "aux_outputs": [{"pred_logits": torch.randn(2, 6, 3), "pred_boxes": torch.rand(2, 6, 4) * 0.5 + 0.25}],
           "enc_outputs": {"pred_logits": torch.randn(2, 10, 1), "pred_boxes": torch.rand(2, 10, 4) * 0.5 + 0.25}}
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    ours = _criterion(alignment_loss=False, num_classes=3)(out, targets)
    ref = SetCriterion(3, HungarianMatcher(2.0, 5.0, 2.0, use_focal=True),
                       {"loss_class": 1.0, "loss_bbox": 1.0, "loss_giou": 1.0}, use_focal=True)(out, targets)
    assert set(ours) == set(ref)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k])
    # with it, the mini-detector's (enc) losses stay the focal ones
    aligned = _criterion(num_classes=3)(out, targets)
    for k in ("loss_class_enc", "loss_bbox_enc", "loss_giou_enc"):
        torch.testing.assert_close(aligned[k], ref[k])
    assert not torch.allclose(aligned["loss_class"], ref["loss_class"])


# --------------------------------------------------------------------------- the whole model
@pytest.mark.parametrize("row", sorted(ROWS))
def test_every_ablation_row_trains_and_reaches_every_parameter(row):
    model = tiny(row)
    losses = training_step(model, synthetic_batch(), expected_loss_keys(num_aux=2, enc=True))
    # every trainable parameter is in the graph (DDP needs no find_unused_parameters); some gradients
    # are still exactly 0 here because the box heads' last layers start at zero
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    for p in (model.class_embed.weight, model.transformer.mini_detector.class_embed.weight,
              model.transformer.decoder.layers[-1].parts[model.transformer.decoder.branches[0]].linear1.weight):
        assert p.grad.abs().sum() > 0
    assert all(torch.isfinite(v) for v in losses.values())


def test_class_head_reads_the_classification_branch_and_box_head_the_localisation_branch():
    model = tiny("sd_detr").eval()
    seen = {}
    hooks = [model.transformer.decoder.norm[b].register_forward_hook(
        lambda m, i, o, b=b: seen.setdefault(b, []).append(o)) for b in ("cls", "loc")]
    hooks += [getattr(model, h).register_forward_pre_hook(lambda m, i, h=h: seen.__setitem__(h, i[0]))
              for h in ("class_embed", "bbox_embed")]
    images, masks = model.preprocess_image(synthetic_batch())
    with torch.no_grad():
        out = model.forward_features(images, masks)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(seen["class_embed"], torch.stack(seen["cls"]))
    torch.testing.assert_close(seen["bbox_embed"], torch.stack(seen["loc"]))
    assert (seen["class_embed"] - seen["bbox_embed"]).abs().max() > 1e-3
    # the box head starts at zero: every layer's boxes are the mini-detector's anchors
    for boxes in [out["pred_boxes"]] + [a["pred_boxes"] for a in out["aux_outputs"]]:
        torch.testing.assert_close(boxes, out["anchors"], atol=1e-5, rtol=0)


def test_task_aware_reference_points_are_the_mean_discriminative_points_inside_the_anchor():
    model = tiny("sd_detr").eval()
    images, masks = model.preprocess_image(synthetic_batch())
    with torch.no_grad():
        out = model.forward_features(images, masks)
    anchors = out["anchors"]
    for b in ("cls", "loc"):
        points, ref = out[f"{b}_points"], out[f"{b}_reference_points"]
        assert points.shape == (*anchors.shape[:2], 8, 2)
        torch.testing.assert_close(ref, points.mean(2))
        assert ((points - anchors[:, :, None, :2]).abs() <= anchors[:, :, None, 2:] / 2 + 1e-6).all()
    assert (out["cls_points"] - out["loc_points"]).abs().max() > 1e-3  # each branch has its own points
    # without task-aware queries both branches use the anchor centre
    plain = tiny("dfl").eval()
    with torch.no_grad():
        out = plain.forward_features(images, masks)
    torch.testing.assert_close(out["cls_reference_points"], out["anchors"][..., :2])
    assert "cls_points" not in out


def test_inference_gives_instances_in_original_image_coordinates():
    model = tiny("sd_detr", **{"model.num_queries": 6}).eval()
    batch = synthetic_batch()
    for x, (h, w) in zip(batch, [(128, 96), (80, 200)]):
        del x["instances"]
        x["height"], x["width"] = h, w
    with torch.no_grad():
        results = model(batch)
    for res, (h, w) in zip(results, [(128, 96), (80, 200)]):
        inst = res["instances"]
        assert inst.image_size == (h, w) and len(inst) == 4 * 3  # min(6 queries, 2x2 tokens) x 3 classes
        b = inst.pred_boxes.tensor
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert (inst.scores[:-1] >= inst.scores[1:]).all()


def test_branch_attention_maps_are_recorded_and_drawn(tmp_path):
    """record_cross_attention sees both branches of every layer; tools/visualize_attention.py
    draws the classification maps above the localisation maps (the paper's Figure 4)."""
    import cv2
    from tiny_configs import build_tiny, write_tiny_config
    from test_tools import load_tool, write_images

    model = tiny("sd_detr").eval()
    images, masks = model.preprocess_image(synthetic_batch())
    with torch.no_grad(), record_cross_attention(model) as maps:
        model.forward_features(images, masks)
    assert len(maps) == 3 * 2 and all(m.shape == (2, 4, 4) for m in maps)

    config = write_tiny_config(tmp_path, "sd_detr")
    _, weights = build_tiny(config)
    (path,) = write_images(str(tmp_path / "images"), [(96, 128)])
    tool = load_tool("visualize_attention")
    args = tool.get_parser().parse_args(
        ["--config-file", config, "--input", path, "--output", str(tmp_path / "out"), "--min-size", "0",
         "--topk", "2", "--save-data", f"train.init_checkpoint={weights}"])
    (png,) = tool.main(args)
    picture, data = cv2.imread(png), np.load(png[:-4] + ".npz")
    assert picture.shape == (2 * 96, 2 * 128, 3)  # rows: classification, localisation; one column per query
    assert str(data["layer"]).endswith("decoder.layers.1.parts")
    for b in ("cls", "loc"):
        maps = data[f"{b}_attention_maps"]
        assert maps.shape == (2, 3, 4)
        np.testing.assert_allclose(maps.sum((1, 2)), 1.0, atol=1e-5)
        assert data[f"{b}_points"].shape == (2, 8, 2) and data[f"{b}_reference_points"].shape == (2, 2)
    assert np.abs(data["cls_attention_maps"] - data["loc_attention_maps"]).max() > 1e-4


def test_point_statistics_tool_measures_offsets_in_half_box_units():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "point_statistics", os.path.join(ROOT, "projects/sd_detr/tools/point_statistics.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    model = tiny("sd_detr").eval()
    images = [x["image"] for x in synthetic_batch()]
    stats = tool.point_statistics(model, images)
    # recomputed directly from the outputs of the same model
    with torch.no_grad():
        outs = [model.forward_features(*model.preprocess_image([{"image": im}])) for im in images]
    for b in ("cls", "loc"):
        direct = np.mean([((o[f"{b}_points"][0] - o["anchors"][0, :, None, :2]) / (o["anchors"][0, :, None, 2:] / 2))
                          .abs().mean().item() for o in outs])
        assert stats[b][0] == pytest.approx(direct, rel=1e-5)
        assert 0.0 <= stats[b][0] <= 1.0 and 0.0 <= stats[b][1] <= 1.0 and 0.0 <= stats[b][2] <= 1.0
    with pytest.raises(ValueError, match="task-aware"):
        tool.point_statistics(tiny("dfl").eval(), images[:1])
