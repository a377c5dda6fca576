"""The shared multi-scale core (``d2detr/modeling/deformable_transformer.py``,
``d2detr/modeling/meta_arch/deformable_detr.py``): geometry that stays float32 under CPU bf16
autocast, every parameter in the graph without auxiliary losses (DDP), and two-stage top-k
counts that stay dynamic in traced and exported graphs."""
import warnings

import pytest
import torch
from detectron2.config import LazyConfig, instantiate

from tiny_configs import random_image, write_tiny_config

from d2detr.layers.dynamic_shapes import num_selected
from d2detr.modeling.deformable_transformer import (
    DeformableTransformerEncoder,
    flatten_multi_level,
    gen_encoder_output_proposals,
)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(tmp_path, method, **extra):
    text = "".join(f"model.{k} = {v!r}\n" for k, v in extra.items())
    torch.manual_seed(0)
    return instantiate(LazyConfig.load(write_tiny_config(tmp_path, method, extra=text)).model)


# ---------------------------------------------------------------- bf16 geometry
def _levels(dtype, sizes=((167, 100), (84, 50)), valid=(150, 91)):
    """Two levels of zeros in ``dtype``; the image covers ``valid`` (h, w) of the first level."""
    srcs, masks, pos = [], [], []
    for i, (h, w) in enumerate(sizes):
        srcs.append(torch.zeros(1, 4, h, w, dtype=dtype))
        m = torch.ones(1, h, w, dtype=torch.bool)
        m[:, : -(-valid[0] * h // sizes[0][0]), : -(-valid[1] * w // sizes[0][1])] = False
        masks.append(m)
        pos.append(torch.zeros(1, 4, h, w, dtype=dtype))
    return srcs, masks, pos


def test_reference_points_and_proposals_stay_float32_under_bf16_autocast():
    """A 167-cell level: bf16 cell centres would be up to half a cell off (8-bit mantissa), bf16
    valid ratios up to ~0.7 cell; the core keeps them float32 (error < 1e-3 cell vs float64)."""
    exact = flatten_multi_level(*_levels(torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = flatten_multi_level(*_levels(torch.bfloat16))
        assert got[0].dtype == torch.bfloat16 and got[5].dtype == torch.float32  # features / valid ratios
        refs = DeformableTransformerEncoder.get_reference_points(got[6], got[5])
        _, proposals = gen_encoder_output_proposals(got[0], got[1], got[6])
    assert refs.dtype == proposals.dtype == torch.float32
    ref64 = DeformableTransformerEncoder.get_reference_points(exact[6], exact[5])
    cells = torch.tensor([100.0, 167.0], dtype=torch.float64)  # (W, H) of the first level
    assert ((refs.double() - ref64).abs() * cells).max() < 1e-3
    _, proposals64 = gen_encoder_output_proposals(exact[0], exact[1], exact[6])
    finite = torch.isfinite(proposals64)
    assert torch.equal(finite, torch.isfinite(proposals))
    centres = torch.sigmoid(proposals.double())[..., :2][finite[..., :2]]
    centres64 = torch.sigmoid(proposals64)[..., :2][finite[..., :2]]
    assert (centres - centres64).abs().max() * 167 < 1e-3


def test_bf16_autocast_predictions_close_to_float32(tmp_path):
    """Deformable DETR (per-query outputs, no top-k that could flip): under CPU bf16 autocast the
    boxes stay within 0.01 of the image size of the float32 ones and the scores within 0.03."""
    model = tiny(tmp_path, "deformable_detr_refine").eval()
    batch = [{"image": random_image(96, 128, s)} for s in (0, 1)]
    images, masks = model.preprocess_image(batch)
    with torch.no_grad():
        fp32 = model.forward_features(images, masks)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model.forward_features(images, masks)
    torch.testing.assert_close(bf16["pred_boxes"].float(), fp32["pred_boxes"], atol=0.01, rtol=0)
    torch.testing.assert_close(bf16["pred_logits"].float().sigmoid(), fp32["pred_logits"].sigmoid(), atol=0.03, rtol=0)


# ------------------------------------------------------------ DDP: no parameter left out
@pytest.mark.parametrize("method", ["deformable_detr_refine", "deformable_detr_two_stage", "dab_deformable_detr"])
def test_without_aux_loss_every_parameter_gets_a_gradient(tmp_path, method):
    """With ``aux_loss=False`` the intermediate layers' own heads have no loss; they are kept in the
    graph with zero gradients so DistributedDataParallel (find_unused_parameters=False) works."""
    from helpers import synthetic_batch

    model = tiny(tmp_path, method, aux_loss=False).train()
    losses = model(synthetic_batch())
    assert not any(k.endswith("_0") for k in losses)
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert model.class_embed[0].weight.grad.abs().sum() == 0  # connected, not trained


# -------------------------------------------------------------- dynamic top-k counts
def test_num_selected_eager_trace_and_export():
    x = torch.randn(2, 30)
    assert num_selected(10, x) == 10 and num_selected(50, x) == 30 and isinstance(num_selected(10, x), int)

    def topk(x):
        return torch.topk(x, num_selected(10, x), dim=1)[1]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(topk, (x,))
    assert traced(torch.randn(2, 5)).shape == (2, 5) and traced(torch.randn(2, 40)).shape == (2, 10)

    class TopK(torch.nn.Module):
        def forward(self, x):
            return topk(x)

    dim = torch.export.Dim("s", min=1, max=100)
    exported = torch.export.export(TopK(), (x,), dynamic_shapes={"x": {1: dim}}).module()
    assert exported(torch.randn(2, 5)).shape == (2, 5) and exported(torch.randn(2, 40)).shape == (2, 10)


def test_two_stage_torchscript_runs_on_fewer_tokens_than_queries(tmp_path):
    """Traced at 128x160 (420 tokens) with 200 queries, the file runs at 64x64 (84 tokens < 200)
    and gives the eager detections there."""
    from d2detr.export.wrapper import ExportableDetector

    model = tiny(tmp_path, "deformable_detr_two_stage", num_queries=200).eval()
    wrapper = ExportableDetector(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, (random_image(128, 160, 0),), check_trace=False)
        small = random_image(64, 64, 1)
        got, ref = traced(small), wrapper(small)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


# ------------------------------------------------------------- decoder-only levels
_RES2_DECODER_ONLY = """
model.backbone.out_features = ["res2", "res3", "res4", "res5"]
model.neck.input_shapes["res2"] = L(ShapeSpec)(channels=24, stride=4)
model.neck.in_features = ["res2", "res3", "res4", "res5"]
model.neck.num_outs = 4
model.transformer.num_feature_levels = 4
model.transformer.num_decoder_only_levels = 1
model.transformer.encoder.encoder_layer.num_levels = 3
model.transformer.decoder.decoder_layer.num_levels = 4
"""


def _tiny_dino(tmp_path, extra=""):
    tmp_path.mkdir(exist_ok=True)
    torch.manual_seed(0)
    return instantiate(LazyConfig.load(write_tiny_config(tmp_path, "dino", extra=extra)).model).eval()


def _three_level_weights(res2_model):
    """``res2_model``'s weights for the plain 3-level model: the neck's projections one index
    down (res2 is its first) and the decoder cross-attention's offsets and weights of levels 0-2
    (the decoder-only level is the last in the decoder's memory)."""
    state = {}
    for key, value in res2_model.state_dict().items():
        if key.startswith("neck.input_proj."):
            idx, rest = key[len("neck.input_proj."):].split(".", 1)
            if idx == "0":
                continue
            key = f"neck.input_proj.{int(idx) - 1}.{rest}"
        elif ".cross_attn.sampling_offsets." in key or ".cross_attn.attention_weights." in key:
            heads = res2_model.transformer.decoder.layers[0].cross_attn.num_heads
            value = value.view(heads, 4, -1, *value.shape[1:])[:, :3].reshape(-1, *value.shape[1:])
        state[key] = value
    return state


def test_decoder_only_level_is_read_by_the_decoder_alone(tmp_path):
    """DINO with MobileNetV2's res2 as a decoder-only level (``num_decoder_only_levels=1``):
    the encoder runs on strides 8/16/32 only; with the decoder's attention to res2 muted (its
    logits at -1e9) the detections equal those of the plain 3-level model with the same weights;
    unmuted, res2 changes the detections but not the encoder's proposals."""
    plain = _tiny_dino(tmp_path / "plain")
    model = _tiny_dino(tmp_path / "res2", _RES2_DECODER_ONLY)
    assert model.transformer.level_embed.shape == (3, 64)  # no embedding for a level without positions
    batch = [{"image": random_image(96, 128, 0)}, {"image": random_image(80, 112, 1)}]  # padded: masks matter
    images, masks = model.preprocess_image(batch)
    with torch.no_grad():  # the box head's last layer starts at zero: boxes would not depend on the decoder
        for p in model.bbox_embed.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with torch.no_grad():  # the decoder-only level gets a mask but no position embedding
        srcs, level_masks, pos = model.multi_scale_features(images, masks)
    assert pos[0] is None and all(p is not None for p in pos[1:]) and level_masks[0].shape == (2, 24, 32)
    seen = {}
    model.transformer.encoder.register_forward_hook(lambda m, args, out: seen.update(shapes=args[1].tolist()))
    with torch.no_grad():
        unmuted = model.forward_features(images, masks)
        assert seen["shapes"] == [[12, 16], [6, 8], [3, 4]]  # 96x128 padded: strides 8, 16, 32
        for layer in model.transformer.decoder.layers:
            w = layer.cross_attn.attention_weights
            rows = w.weight.view(layer.cross_attn.num_heads, 4, -1, w.weight.shape[1])
            rows[:, 3] = 0.0
            w.bias.view(layer.cross_attn.num_heads, 4, -1)[:, 3] = -1e9
        plain.load_state_dict(_three_level_weights(model))
        muted = model.forward_features(images, masks)
        ref = plain.forward_features(images, masks)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(muted[key], ref[key], atol=1e-5, rtol=1e-5)
        assert (unmuted[key] - muted[key]).abs().max() > 1e-3  # res2 is read
    # the decoder's initial anchors are the encoder's selected proposals: res2 does not move them
    torch.testing.assert_close(unmuted["anchors"][0], ref["anchors"][0], atol=1e-5, rtol=1e-5)


def test_decoder_only_levels_refuse_inconsistent_level_counts(tmp_path):
    with pytest.raises(ValueError, match="num_decoder_only_levels must be in"):
        _tiny_dino(tmp_path, "model.transformer.num_decoder_only_levels = 3\n")
    # the encoder layers must attend to the encoded levels only (4 - 1 = 3)
    with pytest.raises(ValueError, match="the encoder layers attend to 4 levels"):
        _tiny_dino(tmp_path, _RES2_DECODER_ONLY + "model.transformer.encoder.encoder_layer.num_levels = 4\n")
    with pytest.raises(ValueError, match="the decoder layers attend to 3 levels"):
        _tiny_dino(tmp_path, _RES2_DECODER_ONLY + "model.transformer.decoder.decoder_layer.num_levels = 3\n")


def test_decoder_only_level_exports_with_dynamic_sizes(tmp_path):
    """TorchScript (trace) and torch.export of the decoder-only-level model, exported at 96x128,
    give the eager model's (pre-NMS) detections at 112x144."""
    from d2detr.export import ExportableDetector, export_torch_export, export_torchscript
    from d2detr.export.api import check_native_op

    model = _tiny_dino(tmp_path, _RES2_DECODER_ONLY)
    try:
        check_native_op(model)
    except Exception as e:  # noqa: BLE001  (the op library is optional in a source checkout)
        pytest.skip(str(e))
    image, other = random_image(96, 128, 0), random_image(112, 144, 1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = export_torchscript(model, image, str(tmp_path / "m.ts"))
        program = export_torch_export(model, image, str(tmp_path / "m.pt2"))
        ref = ExportableDetector(model)(other)
        for got in (traced(other), program.module()(other)):
            for a, b in zip(got, ref):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
