"""AdaMixer's pieces against independent computations (the official formulas written out with
``F.grid_sample``, hand-computed boxes), and the AdaMixer detector end to end on a tiny config."""
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import expected_loss_keys, synthetic_batch, training_step, with_original_sizes
from tiny_configs import build_tiny, write_tiny_config

from d2detr.layers.ms_deform_attn import native_ms_deform_attn_available
from d2detr.modeling.adamixer import (
    AdaMixerStage,
    AdaptiveMixing,
    AdaptiveSamplingMixing,
    QueryState,
    boxes_to_xyzr,
    flatten_pyramid,
    iof_log_bias,
    refine_xyzr,
    sample_3d,
    xyzr_position_embedding,
    xyzr_to_boxes,
)

needs_op = pytest.mark.skipif(not native_ms_deform_attn_available("cpu"), reason="d2detr._C not built")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------- 3D sampling
def official_sampling_3d(xy, z, values, strides, tau=2.0):
    """The official ``sampling_3d`` (MCG-NJU/AdaMixer ``sampling_3d_operator.py``) written out:
    per level, the points normalised by ``(W, H) * stride``, ``F.grid_sample`` per group, weighted
    by ``softmax_l(-(z - log2 stride_l)^2 / tau)``, summed. ``xy [B,Q,G,P,2]``, ``z [B,Q,G,P]``."""
    B, Q, G, P, _ = xy.shape
    log2s = torch.tensor([math.log2(s) for s in strides], dtype=z.dtype)
    weights = torch.softmax(-((z[..., None] - log2s) ** 2) / tau, dim=-1)
    out = 0
    for lvl, (value, stride) in enumerate(zip(values, strides)):
        C, H, W = value.shape[1:]
        normalized = xy / (torch.tensor([W, H], dtype=xy.dtype) * stride)
        grid = normalized.permute(0, 2, 1, 3, 4).flatten(0, 1) * 2 - 1  # [B*G, Q, P, 2]
        sampled = F.grid_sample(value.reshape(B * G, C // G, H, W), grid, mode="bilinear",
                                padding_mode="zeros", align_corners=False)  # [B*G, C/G, Q, P]
        sampled = sampled * weights[..., lvl].permute(0, 2, 1, 3).flatten(0, 1)[:, None]
        out = out + sampled.view(B, G, C // G, Q, P).permute(0, 3, 1, 4, 2)
    return out


@needs_op
def test_sample_3d_matches_grid_sample_forward_and_backward():
    """One ms_deform_attn call == the official per-level grid_sample loop, values and gradients
    (w.r.t. the features, the positions and the scales), points inside and outside the image,
    levels whose size times stride is not the padded size."""
    torch.manual_seed(0)
    B, Q, G, P, C = 2, 5, 4, 3, 8
    strides = [4, 8, 16]
    sizes = [(13, 17), (7, 9), (4, 5)]  # 13*4=52 != 7*8=56: each level normalised by its own size
    values = [torch.randn(B, C, h, w, dtype=torch.float64, requires_grad=True) for h, w in sizes]
    xy = (torch.rand(B, Q, G, P, 2, dtype=torch.float64) * 90 - 10).requires_grad_()  # some outside
    z = (torch.rand(B, Q, G, P, dtype=torch.float64) * 5 + 1).requires_grad_()

    ours = sample_3d(flatten_pyramid(values, strides, G), xy, z)
    ref = official_sampling_3d(xy, z, values, strides)
    assert ours.shape == (B, Q, G, P, C // G)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-10)

    grad = torch.randn_like(ref)
    g_ours = torch.autograd.grad(ours, values + [xy, z], grad)
    g_ref = torch.autograd.grad(ref, values + [xy, z], grad)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_flatten_pyramid_bad_input():
    with pytest.raises(ValueError, match="divisible by the sampling groups"):
        flatten_pyramid([torch.zeros(1, 6, 4, 4)], [8], num_groups=4)
    with pytest.raises(ValueError, match="2 feature levels but 1 strides"):
        flatten_pyramid([torch.zeros(1, 8, 4, 4)] * 2, [8], num_groups=4)


# --------------------------------------------------------------------- boxes, IoF, embedding
def test_xyzr_encodings_hand_computed():
    box = torch.tensor([[2.0, 4.0, 10.0, 6.0]])  # w 8, h 2, centre (6, 5)
    xyzr = boxes_to_xyzr(box, eps=0.0)
    torch.testing.assert_close(xyzr, torch.tensor([[6.0, 5.0, 2.0, -2.0]]))  # z=(3+1)/2, r=1-3
    torch.testing.assert_close(xyzr_to_boxes(xyzr), box)
    # the box update: centre moves by delta * 2^z pixels, z and r add
    new = refine_xyzr(xyzr, torch.tensor([[0.5, -0.25, 1.0, 0.5]]))
    torch.testing.assert_close(new, torch.tensor([[8.0, 4.0, 3.0, -1.5]]))
    # a flipped box (DEQDet's jitter can flip one) encodes like the ordered one
    torch.testing.assert_close(boxes_to_xyzr(torch.tensor([[10.0, 6.0, 2.0, 4.0]]), eps=0.0), xyzr)


def test_iof_log_bias_hand_computed():
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0],    # A, area 100
                           [5.0, 5.0, 15.0, 15.0],    # B, overlaps A by 25
                           [2.0, 2.0, 4.0, 4.0],      # C, inside A, area 4
                           [20.0, 20.0, 30.0, 40.0]]])  # D, disjoint
    iof = torch.tensor([[1.0, 0.25, 0.04, 0.0],
                        [0.25, 1.0, 0.0, 0.0],
                        [1.0, 0.0, 1.0, 0.0],
                        [0.0, 0.0, 0.0, 1.0]])
    torch.testing.assert_close(iof_log_bias(boxes)[0], torch.log(iof + 1e-7))


def test_stage_attention_bias_is_tau_times_log_iof(monkeypatch):
    """The self-attention gets ``tau_h * log(IoF + 1e-7)`` of the input boxes, head h of image b
    at index ``b * heads + h``, and attends over ``content + PE(xyzr)``."""
    torch.manual_seed(0)
    stage = AdaMixerStage(num_classes=3, content_dim=16, feat_channels=16, num_heads=2, ffn_dim=32,
                          in_points=4, out_points=4, num_groups=2)
    seen = {}

    def spy(self, q, k, v, attn_mask=None, need_weights=False):
        seen.update(q=q, mask=attn_mask)
        return torch.zeros_like(q), None

    monkeypatch.setattr(torch.nn.MultiheadAttention, "forward", spy)
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0], [2.0, 2.0, 4.0, 4.0]]]).repeat(2, 1, 1)
    boxes[1, 0] = torch.tensor([0.0, 0.0, 20.0, 20.0])
    xyzr = boxes_to_xyzr(boxes)
    content = torch.randn(2, 3, 16)
    pyramid = flatten_pyramid([torch.randn(2, 16, 4, 4)], [8], num_groups=2)
    stage(pyramid, QueryState(xyzr, content, boxes))
    log_iof = iof_log_bias(boxes)
    expected = torch.stack([stage.iof_tau[h] * log_iof[b] for b in range(2) for h in range(2)])
    torch.testing.assert_close(seen["mask"], expected)
    torch.testing.assert_close(seen["q"], content + xyzr_position_embedding(xyzr, 16))


def test_position_embedding_formula():
    """(x/1000, y/1000, z, r), 64 features each: sin at even, cos at odd features with frequency
    10000^(2*floor(i/2)/64), coordinates one after the other."""
    xyzr = torch.tensor([[[333.0, 250.0, 5.5, -0.75]]])
    pe = xyzr_position_embedding(xyzr, 256)[0, 0]
    scaled = [0.333, 0.25, 5.5, -0.75]
    for c, value in enumerate(scaled):
        for i in (0, 1, 10, 63):
            t = value / 10000 ** (2 * (i // 2) / 64)
            expected = math.sin(t) if i % 2 == 0 else math.cos(t)
            assert pe[c * 64 + i].item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="multiple of 8"):
        xyzr_position_embedding(xyzr, 20)


# ------------------------------------------------------------------------- adaptive mixing
def test_adaptive_mixing_matches_per_query_matrices():
    """Channel mixing with the query's C_in x C_out matrix, spatial mixing with its P_out x P_in
    matrix (both read from parameter_generator's output, group by group), each followed by a
    LayerNorm over the whole [points, channels] map and ReLU, projection + residual."""
    torch.manual_seed(0)
    B, Q, G, P_in, C, P_out, D = 2, 3, 2, 4, 3, 5, 8
    mix = AdaptiveMixing(in_dim=G * C, in_points=P_in, num_groups=G, query_dim=D, out_points=P_out)
    torch.nn.init.normal_(mix.parameter_generator.weight)
    x = torch.randn(B, Q, G, P_in, C)
    query = torch.randn(B, Q, D)
    params = mix.parameter_generator(query).view(B, Q, G, C * C + P_out * P_in)
    out = torch.zeros(B, Q, G, P_out, C)
    for b in range(B):
        for q in range(Q):
            for g in range(G):
                M = params[b, q, g, : C * C].view(C, C)
                S = params[b, q, g, C * C:].view(P_out, P_in)
                h = torch.relu(F.layer_norm(x[b, q, g] @ M, (P_in, C)))
                out[b, q, g] = torch.relu(F.layer_norm(S @ h, (P_out, C)))
    expected = query + mix.out_proj(out.reshape(B, Q, -1))
    torch.testing.assert_close(mix(x, query), expected, atol=1e-5, rtol=1e-5)


def test_sampling_offsets_initialisation():
    """Zero weights; 64 points (a square): a regular 8x8 grid over the box (the official order:
    the first offset runs over rows); 32 points: uniform in [-0.5, 0.5]; dz bias -1. At
    initialisation the points are the box centre + offset * (w, h), at z - 1."""
    grid = AdaptiveSamplingMixing(content_dim=16, feat_channels=16, in_points=64, num_groups=2)
    grid.reset_parameters()
    bias = grid.sampling_offset_generator.bias.view(2, 64, 3)
    steps = torch.arange(-0.4375, 0.5, 0.125)
    torch.testing.assert_close(bias[0, :, 0], steps.repeat_interleave(8))
    torch.testing.assert_close(bias[1, :, 1], steps.repeat(8))
    assert (bias[..., 2] == -1).all() and (grid.sampling_offset_generator.weight == 0).all()
    xyzr = boxes_to_xyzr(torch.tensor([[[10.0, 20.0, 50.0, 40.0]]]), eps=0.0)  # w 40, h 20
    xy, z = grid.sampling_points(torch.randn(1, 1, 16), xyzr)
    torch.testing.assert_close(xy[0, 0, 0, 9], torch.tensor([30 + 40 * steps[1], 30 + 20 * steps[1]]))
    torch.testing.assert_close(z, xyzr[..., 2].view(1, 1, 1, 1).expand(1, 1, 2, 64) - 1)

    uniform = AdaptiveSamplingMixing(content_dim=16, feat_channels=16, in_points=32, num_groups=2)
    uniform.reset_parameters()
    b = uniform.sampling_offset_generator.bias.view(2, 32, 3)
    assert b[..., :2].abs().max() <= 0.5 and b[..., :2].std() > 0.2 and (b[..., 2] == -1).all()
    assert (uniform.adaptive_mixing.parameter_generator.weight == 0).all()


# ------------------------------------------------------------------- matcher and criterion
def test_l1_on_xyxy_boxes_in_matcher_and_criterion():
    """mmdet's L1 cost and loss (AdaMixer, DEQDet) are between normalised XYXY boxes, which
    differs from the L1 between cxcywh boxes of the DETR family; GIoU is the same."""
    from d2detr.layers.box_ops import box_xyxy_to_cxcywh, generalized_box_iou
    from d2detr.modeling.criterion import SetCriterion
    from d2detr.modeling.matcher import HungarianMatcher

    pred = torch.tensor([[0.1, 0.1, 0.6, 0.6], [0.0, 0.0, 1.0, 1.0]])
    gt = torch.tensor([[0.15, 0.2, 0.55, 0.9]])
    outputs = {"pred_logits": torch.zeros(1, 2, 1), "pred_boxes": box_xyxy_to_cxcywh(pred)[None]}
    targets = [{"labels": torch.tensor([0]), "boxes": box_xyxy_to_cxcywh(gt)}]
    l1_xyxy = (pred - gt).abs().sum(-1)  # [0.05+0.1+0.05+0.3, 0.15+0.2+0.45+0.1]
    torch.testing.assert_close(l1_xyxy, torch.tensor([0.5, 0.9]))
    l1_cxcywh = (box_xyxy_to_cxcywh(pred) - box_xyxy_to_cxcywh(gt)).abs().sum(-1)
    assert not torch.allclose(l1_xyxy, l1_cxcywh)
    giou = generalized_box_iou(pred, gt)[:, 0]
    matcher = HungarianMatcher(cost_class=0.0, cost_bbox=5.0, cost_giou=2.0, use_focal=True, l1_box_format="xyxy")
    torch.testing.assert_close(matcher.cost_matrix(outputs, targets)[0, :, 0], 5 * l1_xyxy - 2 * giou)
    criterion = SetCriterion(1, matcher, {"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}, use_focal=True,
                             l1_box_format="xyxy")
    losses = criterion.loss_boxes(outputs, targets, [(torch.tensor([1]), torch.tensor([0]))], num_boxes=1.0)
    torch.testing.assert_close(losses["loss_bbox"], l1_xyxy[1])
    torch.testing.assert_close(losses["loss_giou"], 1 - giou[1])
    with pytest.raises(ValueError, match="l1_box_format"):
        HungarianMatcher(l1_box_format="xywh")


# ------------------------------------------------------------------------ the detector
def tiny_adamixer(tmp_path, extra=""):
    model, _ = build_tiny(write_tiny_config(tmp_path, "adamixer", extra=extra))
    return model


@needs_op
def test_adamixer_train_step_every_stage_supervised(tmp_path):
    """Every stage has its own weights and its own losses; bf16 autocast on the CPU trains too."""
    model = tiny_adamixer(tmp_path)
    assert len(model.stages) == 2
    assert model.stages[0].fc_cls.weight is not model.stages[1].fc_cls.weight
    assert not torch.equal(model.stages[0].fc_cls.weight, model.stages[1].fc_cls.weight)  # own init
    batch = synthetic_batch()
    training_step(model, batch, expected_loss_keys(1))
    for stage in model.stages:  # every stage's parameter generator gets a gradient
        assert stage.sampling_mixing.adaptive_mixing.parameter_generator.weight.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())


@needs_op
def test_adamixer_inference_in_original_coordinates(tmp_path):
    """Detections are XYXY pixels of the original image (here 2x the input), inside it; at
    initialisation every query predicts the whole image."""
    model = tiny_adamixer(tmp_path).eval()
    batch = with_original_sizes(synthetic_batch(), [(128, 128), (64, 128)])
    with torch.no_grad():
        out = model(batch)
    boxes = out[0]["instances"].pred_boxes.tensor
    assert len(boxes) == 10
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.0, 128.0, 128.0]]).expand(10, 4), atol=1e-3, rtol=0)
    torch.testing.assert_close(out[1]["instances"].pred_boxes.tensor[0], torch.tensor([0.0, 0.0, 128.0, 64.0]),
                               atol=1e-3, rtol=0)


def test_adamixer_bad_configs(tmp_path):
    with pytest.raises(ValueError, match="neck gives 32"):
        tiny_adamixer(tmp_path, "model.stage.feat_channels = 64\n")
    with pytest.raises(ValueError, match="num_queries"):
        tiny_adamixer(tmp_path, "model.queries.num_queries = 5\n")
    with pytest.raises(ValueError, match="num_stages"):
        tiny_adamixer(tmp_path, "model.num_stages = 0\n")


@needs_op
def test_visualize_sampling_points(tmp_path):
    """tools/visualize_attention.py draws a query's 3D sampling points: one panel per query; at
    initialisation (zero offset weights) the recorded points are the box centre + the offset
    biases times the box size, at z - 1, with level weights summing to 1 over the 3 levels."""
    import importlib.util
    import os

    import cv2
    import numpy as np
    from tiny_configs import REPO, random_image

    config = write_tiny_config(tmp_path, "adamixer")
    model, weights = build_tiny(config)
    image_path = str(tmp_path / "img.png")
    cv2.imwrite(image_path, random_image(96, 128, 0).permute(1, 2, 0).numpy())
    spec = importlib.util.spec_from_file_location("visualize_attention", os.path.join(REPO, "tools", "visualize_attention.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = tool.get_parser().parse_args(["--config-file", config, "--input", image_path, "--output", str(tmp_path / "out"),
                                         "--min-size", "0", "--topk", "2", "--layer", "0", "--save-data",
                                         f"train.init_checkpoint={weights}"])
    (png,) = tool.main(args)
    assert cv2.imread(png).shape == (96, 128 * 2, 3)
    data = np.load(png[:-4] + ".npz")
    assert str(data["layer"]) == "stages.0.sampling_mixing" and list(data["strides"]) == [8, 16, 32]
    G, P = 4, 6
    bias = model.stages[0].sampling_mixing.sampling_offset_generator.bias.detach().view(G, P, 3).numpy()
    for box, points, z in zip(data["input_boxes"], data["sampling_points"], data["sampling_z"]):
        np.testing.assert_allclose(box, [0, 0, 128, 96], atol=1e-3)  # the whole image
        np.testing.assert_allclose(points, np.array([64, 48]) + bias[..., :2] * np.array([128, 96]), atol=1e-3)
        np.testing.assert_allclose(z, 0.5 * np.log2(128 * 96) + bias[..., 2], atol=1e-4)
    np.testing.assert_allclose(data["level_weights"].sum(-1), 1.0, atol=1e-5)
