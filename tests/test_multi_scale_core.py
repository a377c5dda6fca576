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
