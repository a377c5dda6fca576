"""d2detr::ms_deform_attn on the CPU: native kernels vs the grid_sample reference,
gradients, input validation, the module, and the op inside TorchScript /
torch.export / torch.compile (CUDA kernels: tests/test_ms_deform_attn_cuda.py)."""
import importlib
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

msda = importlib.import_module("d2detr.layers.ms_deform_attn")  # the package attribute is the function
from d2detr.layers import MultiScaleDeformableAttention, ms_deform_attn, ms_deform_attn_reference
from d2detr.layers.ms_deform_attn import get_library_path, native_ms_deform_attn_available

NATIVE = native_ms_deform_attn_available("cpu")
needs_native = pytest.mark.skipif(not NATIVE, reason="d2detr._C not built (python setup.py build_ext --inplace)")


def make_inputs(N, Q, M, D, levels, P, dtype=torch.float64, lo=-0.1, hi=1.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.long).view(-1, 2)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cumsum(sizes, 0) - sizes
    S, L = int(sizes.sum()), shapes.shape[0]
    value = torch.randn(N, S, M, D, generator=g, dtype=dtype)
    loc = (torch.rand(N, Q, M, L, P, 2, generator=g, dtype=dtype) * (hi - lo) + lo).to(dtype)
    weights = torch.rand(N, Q, M, L, P, generator=g, dtype=dtype)
    return value, shapes, starts, loc, weights


def grads(fn, value, shapes, starts, loc, weights, seed=1):
    value, loc, weights = (t.detach().clone().requires_grad_() for t in (value, loc, weights))
    out = fn(value, shapes, starts, loc, weights)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    return (out, *torch.autograd.grad(out, (value, loc, weights), g))


def assert_close_rel(a, b, tol):
    scale = max(b.abs().max().item(), 1.0)
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= tol * scale, f"max abs err {err:.3g} > {tol:.1g} * {scale:.3g}"


# --------------------------------------------------------------------------- #
# Numerics                                                                    #
# --------------------------------------------------------------------------- #
CASES = [
    # N, Q, M, D, levels, P
    (2, 13, 2, 1, [(6, 4), (3, 5), (2, 2)], 3),
    (1, 9, 3, 3, [(5, 7)], 2),  # a single level
    (2, 7, 2, 30, [(8, 3), (4, 2), (1, 1)], 4),
    (1, 11, 4, 32, [(9, 9), (5, 5), (3, 3), (2, 2)], 4),
    (2, 5, 1, 64, [(4, 10), (2, 5)], 2),
    (1, 6, 2, 71, [(3, 7), (7, 3)], 3),
    (1, 4, 1, 257, [(4, 5), (2, 3)], 2),
]


@needs_native
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}Q{c[1]}M{c[2]}D{c[3]}L{len(c[4])}P{c[5]}")
def test_native_matches_reference_float64(case):
    N, Q, M, D, levels, P = case
    inputs = make_inputs(N, Q, M, D, levels, P, torch.float64, seed=D)
    got = grads(ms_deform_attn, *inputs)
    ref = grads(ms_deform_attn_reference, *inputs)
    assert got[0].shape == (N, Q, M * D)
    for a, b in zip(got, ref):
        assert a.dtype == torch.float64 and a.shape == b.shape
        assert_close_rel(a, b, 1e-12)


@needs_native
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}Q{c[1]}M{c[2]}D{c[3]}L{len(c[4])}P{c[5]}")
def test_native_matches_reference_float32(case):
    N, Q, M, D, levels, P = case
    inputs64 = make_inputs(N, Q, M, D, levels, P, torch.float64, seed=D)
    inputs32 = [t.float() if t.is_floating_point() else t for t in inputs64]
    got = grads(ms_deform_attn, *inputs32)
    ref = grads(ms_deform_attn_reference, *inputs64)
    names = ["output", "grad_value", "grad_locations", "grad_weights"]
    for name, a, b in zip(names, got, ref):
        assert a.dtype == torch.float32, name
        # location gradients scale with W, H: float32 rounding of x*W-0.5 matters more there
        assert_close_rel(a.double(), b, 1e-3 if name == "grad_locations" else 1e-5)


@needs_native
def test_locations_outside_and_on_borders():
    """Borders of the map, of the sampling support (pixel -1 and W) and far outside."""
    levels = [(4, 8), (2, 1)]  # powers of two: the border coordinates below are exact in floating point
    value, shapes, starts, _, weights = make_inputs(1, 1, 2, 8, levels, 1, torch.float64)
    xs = []
    for H, W in levels:
        # normalised coordinates landing exactly on pixel -1, -0.5, 0, W-1, W-0.5, W and beyond
        px = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, W - 1.0, W - 0.5, W, W + 1.0], dtype=torch.float64)
        py = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, H - 1.0, H - 0.5, H, H + 1.0], dtype=torch.float64)
        gx, gy = torch.meshgrid((px + 0.5) / W, (py + 0.5) / H, indexing="ij")
        xs.append(torch.stack([gx.flatten(), gy.flatten()], -1))
    extra = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [-5.0, 0.5], [0.5, 7.0], [1e6, -1e6]],
                         dtype=torch.float64)
    pts = torch.stack([torch.cat([x, extra]) for x in xs], 1)  # [Q, L, 2]
    Q = pts.shape[0]
    loc = pts[None, :, None, :, None, :].expand(1, Q, 2, 2, 1, 2).contiguous()
    weights = torch.rand(1, Q, 2, 2, 1, dtype=torch.float64)
    got = grads(ms_deform_attn, value, shapes, starts, loc, weights)
    ref = grads(ms_deform_attn_reference, value, shapes, starts, loc, weights)
    for i in (0, 1, 3):  # output, grad_value, grad_weights
        assert_close_rel(got[i], ref[i], 1e-12)
    # On integer pixel coordinates bilinear sampling has a kink; like grid_sample
    # the kernel then takes the cell to the right/below (floor).
    assert_close_rel(got[2], ref[2], 1e-12)
    assert got[2].abs().max() > 0
    # NaN locations read nothing (no out-of-bounds access)
    loc_nan = loc.clone()
    loc_nan[0, 0] = float("nan")
    out = ms_deform_attn(value, shapes, starts, loc_nan, weights)
    assert torch.all(out[0, 0] == 0) and torch.isfinite(out[0, 1:]).all()


@needs_native
def test_gradcheck_float64():
    value, shapes, starts, loc, weights = make_inputs(2, 3, 2, 3, [(3, 4), (2, 3)], 2, torch.float64, lo=0.02, hi=0.98)
    value.requires_grad_()
    loc.requires_grad_()
    weights.requires_grad_()
    f = lambda v, l, w: torch.ops.d2detr.ms_deform_attn(v, shapes, starts, l, w)  # noqa: E731
    assert torch.autograd.gradcheck(f, (value, loc, weights), eps=1e-6, atol=1e-7)


@needs_native
def test_zero_queries_and_empty_batch():
    for N, Q in ((2, 0), (0, 3)):
        value, shapes, starts, loc, weights = make_inputs(N, Q, 2, 4, [(3, 3), (2, 1)], 2)
        out, gv, gl, gw = grads(ms_deform_attn, value, shapes, starts, loc, weights)
        assert out.shape == (N, Q, 8)
        assert gv.shape == value.shape and torch.all(gv == 0)
        assert gl.shape == loc.shape and gw.shape == weights.shape


@needs_native
def test_threads_and_layouts_agree():
    """Both backward strategies (per-(batch, head) ownership and per-thread
    buffers when N*M < threads) and non-contiguous inputs give the same result."""
    torch_threads = torch.get_num_threads()
    try:
        for M in (1, 4):
            inputs = make_inputs(1, 64, M, 16, [(8, 6), (4, 3)], 4)
            ref = grads(ms_deform_attn_reference, *inputs)
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                for a, b in zip(grads(ms_deform_attn, *inputs), ref):
                    assert_close_rel(a, b, 1e-12)
    finally:
        torch.set_num_threads(torch_threads)
    value, shapes, starts, loc, weights = make_inputs(2, 5, 3, 8, [(4, 4)], 2)
    v_nc = value.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    l_nc = loc.transpose(1, 2).contiguous().transpose(1, 2)
    w_nc = torch.rand(2, 5, 3, 1, 4, dtype=torch.float64)[..., ::2]
    assert not (v_nc.is_contiguous() or l_nc.is_contiguous() or w_nc.is_contiguous())
    torch.testing.assert_close(
        ms_deform_attn(v_nc, shapes, starts, l_nc, w_nc),
        ms_deform_attn_reference(value, shapes, starts, loc, w_nc.contiguous()),
        rtol=0, atol=1e-12,
    )


@needs_native
def test_opcheck():
    """Schema, fake (Meta) kernel, autograd registration and AOT dispatch checks."""
    value, shapes, starts, loc, weights = make_inputs(1, 4, 2, 8, [(3, 4), (2, 2)], 2)
    args = (value.requires_grad_(), shapes, starts, loc.requires_grad_(), weights.requires_grad_())
    torch.library.opcheck(torch.ops.d2detr.ms_deform_attn.default, args)
    g = torch.randn(1, 4, 16, dtype=torch.float64)
    torch.library.opcheck(torch.ops.d2detr.ms_deform_attn_backward.default, tuple(a.detach() for a in args) + (g,))


# --------------------------------------------------------------------------- #
# Input validation: the same clear errors from the native op and the reference #
# --------------------------------------------------------------------------- #
def _bad_inputs():
    v, s, i, l, w = make_inputs(2, 3, 2, 4, [(3, 4), (2, 2)], 2, torch.float32)
    cases = {
        "value rank": ((v[0], s, i, l, w), ValueError, "value must be 4-D"),
        "spatial_shapes shape": ((v, s.flatten(), i, l, w), ValueError, "spatial_shapes must be \\[L, 2\\]"),
        "level_start_index length": ((v, s, i[:1], l, w), ValueError, "level_start_index must be \\[L\\]"),
        "locations rank": ((v, s, i, l[..., 0], w), ValueError, "sampling_locations must be 6-D"),
        "locations batch": ((v, s, i, l[:1], w[:1]), ValueError, "sampling_locations must be \\[N=2"),
        "locations levels": ((v, s, i, l[:, :, :, :1], w[:, :, :, :1]), ValueError, "L=2"),
        "weights shape": ((v, s, i, l, w[..., :1]), ValueError, "attention_weights must be \\[N, Q, M, L, P\\]"),
        "spatial_shapes dtype": ((v, s.int(), i, l, w), TypeError, "spatial_shapes must be int64"),
        "level_start_index dtype": ((v, s, i.float(), l, w), TypeError, "level_start_index must be int64"),
        "integer value": ((v.long(), s, i, l, w), TypeError, "value must be a floating-point"),
        "S mismatch": ((v[:, :-1], s, i, l, w), ValueError, "sum\\(H\\*W\\) = 16"),
        "level_start_index values": ((v, s, i + 1, l, w), ValueError, "level_start_index"),
        "non-positive shape": (
            (v, torch.tensor([[3, 4], [0, 4]]), i, l, w), ValueError, "spatial_shapes must be positive"),
        "device mismatch": ((v.to("meta"), s, i, l, w), ValueError, "one device"),
    }
    return cases


_CASES = _bad_inputs()


@needs_native
@pytest.mark.parametrize("name", list(_CASES))
def test_native_errors(name):
    args, exc, match = _CASES[name]
    with pytest.raises(exc, match=match):
        torch.ops.d2detr.ms_deform_attn(*args)
    if args[0].device.type == "cpu":
        g = torch.zeros(args[3].shape[0] if args[3].dim() == 6 else 1, 3, 8, dtype=args[0].dtype)
        with pytest.raises((ValueError, TypeError)):
            torch.ops.d2detr.ms_deform_attn_backward(*args, g)


@pytest.mark.parametrize("name", [k for k in _CASES if k != "device mismatch"])
def test_reference_path_errors(name, monkeypatch):
    args, exc, match = _CASES[name]
    monkeypatch.setattr(msda, "_NATIVE", False)
    monkeypatch.setattr(msda, "_WARNED", True)
    with pytest.raises(exc, match=match):
        msda.ms_deform_attn(*args)


@needs_native
def test_backward_grad_output_checked():
    v, s, i, l, w = make_inputs(1, 3, 2, 4, [(3, 4)], 2)
    with pytest.raises(ValueError, match="grad_output must be \\[N, Q, M \\* D\\]"):
        torch.ops.d2detr.ms_deform_attn_backward(v, s, i, l, w, torch.zeros(1, 3, 7, dtype=v.dtype))
    with pytest.raises(TypeError, match="grad_output must be a floating-point"):
        torch.ops.d2detr.ms_deform_attn_backward(v, s, i, l, w, torch.zeros(1, 3, 8, dtype=torch.long))
    # another floating dtype is converted to the computation dtype (value's, float64 here)
    g = torch.randn(1, 3, 8, dtype=torch.float64).float()
    got = torch.ops.d2detr.ms_deform_attn_backward(v, s, i, l, w, g)
    expected = torch.ops.d2detr.ms_deform_attn_backward(v, s, i, l, w, g.double())
    for a, b in zip(got, expected):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fallback_warns_once_and_matches(monkeypatch):
    monkeypatch.setattr(msda, "_NATIVE", False)
    monkeypatch.setattr(msda, "_WARNED", False)
    inputs = make_inputs(1, 4, 2, 4, [(3, 4), (2, 2)], 2)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out1 = msda.ms_deform_attn(*inputs)
        out2 = msda.ms_deform_attn(*inputs)
    msgs = [r for r in rec if "native ms_deform_attn unavailable" in str(r.message)]
    assert len(msgs) == 1 and msgs[0].category is RuntimeWarning
    torch.testing.assert_close(out1, ms_deform_attn_reference(*inputs))
    torch.testing.assert_close(out1, out2)


@needs_native
def test_native_path_does_not_warn():
    inputs = make_inputs(1, 4, 2, 4, [(3, 4)], 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ms_deform_attn(*inputs)


# --------------------------------------------------------------------------- #
# Module                                                                       #
# --------------------------------------------------------------------------- #
def _module_inputs(N=2, Q=7, C=32, levels=((8, 6), (4, 3), (2, 2)), box=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.long)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cumsum(sizes, 0) - sizes
    S, L = int(sizes.sum()), len(levels)
    query = torch.randn(N, Q, C, generator=g)
    ref = torch.rand(N, Q, L, 4 if box else 2, generator=g)
    value = torch.randn(N, S, C, generator=g)
    return query, ref, value, shapes, starts


def _module(C=32, heads=4, levels=3, points=2, seed=0):
    torch.manual_seed(seed)
    m = MultiScaleDeformableAttention(C, heads, levels, points)
    with torch.no_grad():  # move away from the all-zero init so that every path matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


def test_module_init_matches_deformable_detr():
    m = MultiScaleDeformableAttention()
    assert [n for n, _ in m.named_children()] == ["sampling_offsets", "attention_weights", "value_proj", "output_proj"]
    assert m.sampling_offsets.weight.abs().sum() == 0
    assert m.attention_weights.weight.abs().sum() == 0 and m.attention_weights.bias.abs().sum() == 0
    bias = m.sampling_offsets.bias.view(8, 4, 4, 2)
    # head h points along angle 2*pi*h/8, normalised so that max(|x|, |y|) = 1, point i scaled by i + 1
    torch.testing.assert_close(bias[0, 0, :, :], torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]]))
    torch.testing.assert_close(bias[1, 2, 0], torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(bias[6, 3, 1], torch.tensor([0.0, -2.0]), atol=1e-6, rtol=0)
    assert torch.equal(bias[:, 0], bias[:, 3])  # same for every level
    assert m.value_proj.bias.abs().sum() == 0 and m.output_proj.bias.abs().sum() == 0


def _module_forward_reference(m, query, ref, value, shapes, starts, mask=None):
    """The official MSDeformAttn.forward, written out with the reference op."""
    N, Q, C = query.shape
    M, L, P = m.num_heads, m.num_levels, m.num_points
    v = m.value_proj(value)
    if mask is not None:
        v = v.masked_fill(mask[..., None], 0.0)
    v = v.view(N, -1, M, C // M)
    off = m.sampling_offsets(query).view(N, Q, M, L, P, 2)
    aw = m.attention_weights(query).view(N, Q, M, L * P).softmax(-1).view(N, Q, M, L, P)
    if ref.shape[-1] == 2:
        norm = torch.stack([shapes[..., 1], shapes[..., 0]], -1)
        loc = ref[:, :, None, :, None, :] + off / norm[None, None, None, :, None, :]
    else:
        loc = ref[:, :, None, :, None, :2] + off / P * ref[:, :, None, :, None, 2:] * 0.5
    return m.output_proj(ms_deform_attn_reference(v, shapes, starts, loc, aw))


@pytest.mark.parametrize("box", [False, True])
def test_module_forward_matches_official_formula(box):
    m = _module()
    query, ref, value, shapes, starts = _module_inputs(box=box)
    mask = torch.zeros(value.shape[:2], dtype=torch.bool)
    mask[1, -10:] = True
    out = m(query, ref, value, shapes, starts, mask)
    assert out.shape == query.shape
    torch.testing.assert_close(out, _module_forward_reference(m, query, ref, value, shapes, starts, mask),
                               rtol=1e-4, atol=1e-5)
    # padded tokens do not matter
    value2 = value.clone()
    value2[1, -10:] = 1e3
    torch.testing.assert_close(m(query, ref, value2, shapes, starts, mask), out)
    with pytest.raises(ValueError, match="reference_points"):
        m(query, torch.rand(2, 7, 3, 3), value, shapes, starts)


class RecordOpDtypes(TorchDispatchMode):
    """Records the dtypes (value, locations, weights) that reach the kernels of
    d2detr::ms_deform_attn, i.e. after autograd and autocast (also used by
    tests/test_ms_deform_attn_cuda.py)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.d2detr.ms_deform_attn.default:
            self.calls.append((args[0].dtype, args[3].dtype, args[4].dtype))
        return func(*args, **(kwargs or {}))


@needs_native
def test_autocast_keeps_value_dtype_and_casts_locations_weights_to_float32():
    value, shapes, starts, loc, weights = make_inputs(1, 3, 2, 8, [(3, 4)], 2, torch.float32)
    bf = torch.bfloat16
    for v, expected in ((value.to(bf), (bf, torch.float32, torch.float32)), (value, (torch.float32,) * 3)):
        with torch.autocast("cpu", dtype=bf), RecordOpDtypes() as rec:
            out = ms_deform_attn(v, shapes, starts, loc.to(bf), weights.to(bf))
        assert rec.calls == [expected]
        assert out.dtype == v.dtype
        # = the op outside autocast on the same (bfloat16-valued) inputs with float32 locations / weights
        torch.testing.assert_close(out, ms_deform_attn(v, shapes, starts, loc.to(bf).float(), weights.to(bf).float()),
                                   rtol=0, atol=0)


@needs_native
@pytest.mark.parametrize("compute_in_float32", [False, True])
def test_module_autocast_cpu_bfloat16(compute_in_float32):
    m = _module()
    m.compute_in_float32 = compute_in_float32
    inputs = _module_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16), RecordOpDtypes() as rec:
        out = m(*inputs)
    assert out.dtype == torch.bfloat16  # output_proj runs in bfloat16
    # value comes out of value_proj in bfloat16 and stays so, unless the float32 policy is on
    value_dtype = torch.float32 if compute_in_float32 else torch.bfloat16
    assert rec.calls == [(value_dtype, torch.float32, torch.float32)]
    torch.testing.assert_close(out.float(), m(*inputs), rtol=0.05, atol=0.05)


def test_compute_in_float32_default_and_repr():
    assert MultiScaleDeformableAttention(32, 4, 1, 1).compute_in_float32 is False
    try:
        msda.set_compute_in_float32_default(True)
        m = MultiScaleDeformableAttention(32, 4, 1, 1)
        assert m.compute_in_float32 is True and "compute_in_float32=True" in repr(m)
        assert MultiScaleDeformableAttention(32, 4, 1, 1, compute_in_float32=False).compute_in_float32 is False
    finally:
        msda.set_compute_in_float32_default(False)


# --------------------------------------------------------------------------- #
# Mixed dtypes: accepted alike by the kernels, the Meta kernel and the reference #
# --------------------------------------------------------------------------- #
MIXED = [  # value, sampling_locations, attention_weights
    (torch.float16, torch.float16, torch.float16),  # model.half() without autocast
    (torch.bfloat16, torch.float32, torch.bfloat16),
    (torch.float32, torch.float64, torch.float16),
    (torch.float64, torch.float32, torch.float32),
]


@needs_native
@pytest.mark.parametrize("dtypes", MIXED, ids=lambda d: "-".join(str(t).split(".")[1] for t in d))
def test_mixed_dtypes_follow_one_policy(dtypes):
    """Output in value's dtype, each gradient in its input's dtype, numbers those of
    the computation dtype (float64 for a float64 value, else float32); the Meta
    kernel agrees (opcheck runs it on FakeTensors and compares with the CPU kernel)."""
    vt, lt, wt = dtypes
    value, shapes, starts, loc, weights = make_inputs(1, 5, 2, 8, [(4, 4), (2, 2)], 2)
    # pixel coordinates >= 0.1 px from an integer: float32 and float64 see the same
    # bilinear cell (the location gradient jumps between cells)
    wh = torch.tensor([[4.0, 4.0], [2.0, 2.0]], dtype=torch.float64)[:, None, :]  # [L, 1, (W, H)]
    pix = loc * wh - 0.5
    loc = (pix.floor() + 0.1 + 0.8 * pix.frac().abs() + 0.5) / wh
    value, loc, weights = value.to(vt), loc.to(lt), weights.to(wt)
    out, gv, gl, gw = grads(ms_deform_attn, value, shapes, starts, loc, weights)
    assert (out.dtype, gv.dtype, gl.dtype, gw.dtype) == (vt, vt, lt, wt)
    ct = torch.float64 if vt == torch.float64 else torch.float32
    # (cast to value's dtype so that `grads` rounds the output gradient as for the op)
    ref = grads(lambda *a: ms_deform_attn_reference(*a).to(vt), value.to(ct), shapes, starts, loc.to(ct),
                weights.to(ct))
    # allowed: the computation dtype's rounding, then one rounding to the result dtype
    eps = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
    for a, b in zip((out, gv, gl, gw), ref):
        assert_close_rel(a.double(), b.double(), max(eps[a.dtype], eps[ct]))
    # the fallback applies the same policy
    for a, b in zip(grads(ms_deform_attn_reference, value, shapes, starts, loc, weights), (out, gv, gl, gw)):
        assert a.dtype == b.dtype
        assert_close_rel(a.double(), b.double(), max(eps[a.dtype], eps[ct]))
    args = (value.requires_grad_(), shapes, starts, loc.requires_grad_(), weights.requires_grad_())
    torch.library.opcheck(torch.ops.d2detr.ms_deform_attn.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    g = torch.randn(1, 5, 16).to(vt)
    torch.library.opcheck(torch.ops.d2detr.ms_deform_attn_backward.default,
                          tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args) + (g,),
                          test_utils=("test_schema", "test_faketensor"))


@needs_native
def test_half_module_exports_and_compiles():
    """model.half() without autocast: float16 locations reach the op; torch.export and
    torch.compile trace it (Meta kernel) and the traced program runs (CPU kernel)."""
    m = _module().half()
    query, ref, value, shapes, starts = _module_inputs()
    inputs = (query.half(), ref.half(), value.half(), shapes, starts)
    with RecordOpDtypes() as rec:
        eager = m(*inputs)
    assert rec.calls == [(torch.float16,) * 3] and eager.dtype == torch.float16
    torch.testing.assert_close(eager.float(), _module()(query, ref, value, shapes, starts), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(torch.export.export(m, inputs).module()(*inputs), eager)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(m, fullgraph=True, backend="aot_eager")(*inputs), eager)


# --------------------------------------------------------------------------- #
# Borders of the sampling support: the location gradient at pixel -1            #
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "device,dtype",
    [("cpu", torch.float64), ("cpu", torch.float32),
     pytest.param("cuda", torch.float32, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))],
)
def test_location_gradient_at_pixel_minus_one(device, dtype):
    """At pixel x = -1 (or y = -1) the output is 0 (the in-map corner has weight 0)
    but, as in grid_sample, d/dx is not: a * W * <g, hy v[y0, 0] + ly v[y0+1, 0]>.
    A support test of x > -1 instead of x >= -1 loses it. Power-of-two levels keep
    every coordinate exact."""
    if device == "cuda":
        assert native_ms_deform_attn_available("cuda"), "d2detr._C was built without CUDA kernels"
    elif not NATIVE:
        pytest.skip("d2detr._C not built")
    H, W = 4, 8
    shapes, starts = torch.tensor([[H, W]]), torch.tensor([0])
    g = torch.Generator().manual_seed(0)
    D = 5
    value = torch.randn(1, H * W, 1, D, generator=g, dtype=torch.float64)
    # (pixel x, pixel y): left border, top border, the corner, and two just outside
    px = torch.tensor([-1.0, 2.75, -1.0, -1.0 - 2**-10, 3.5], dtype=torch.float64)
    py = torch.tensor([1.25, -1.0, -1.0, 2.0, -1.0 - 2**-10], dtype=torch.float64)
    Q = len(px)
    loc = torch.stack([(px + 0.5) / W, (py + 0.5) / H], -1).view(1, Q, 1, 1, 1, 2)
    attn = torch.tensor([0.5, 0.25, 2.0, 1.0, 1.0], dtype=torch.float64).view(1, Q, 1, 1, 1)
    go = torch.randn(1, Q, D, generator=g, dtype=torch.float64)

    v = value.view(H, W, D)
    expected = torch.zeros(Q, 2, dtype=torch.float64)
    # x = -1, y = 1.25: only the x = 0 column is in the map, weights hy = 0.75, ly = 0.25
    expected[0, 0] = attn[0, 0].item() * W * (go[0, 0] @ (0.75 * v[1, 0] + 0.25 * v[2, 0]))
    # y = -1, x = 2.75: only the y = 0 row, weights hx = 0.25, lx = 0.75
    expected[1, 1] = attn[0, 1].item() * H * (go[0, 1] @ (0.25 * v[0, 2] + 0.75 * v[0, 3]))
    # the corner (-1, -1) and points just outside: no gradient

    args = [t.to(device, dtype, copy=True) for t in (value, loc, attn)]
    for t in args:
        t.requires_grad_()
    out = torch.ops.d2detr.ms_deform_attn(args[0], shapes.to(device), starts.to(device), args[1], args[2])
    out.backward(go.to(device, dtype))
    assert bool((out == 0).all())
    got = args[1].grad.view(Q, 2).double().cpu()
    assert got[0, 0] != 0 and got[1, 1] != 0
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    # grid_sample agrees
    lr = loc.clone().requires_grad_()
    ms_deform_attn_reference(value, shapes, starts, lr, attn).backward(go)
    torch.testing.assert_close(lr.grad.view(Q, 2), expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- #
# Determinism, fallback on a missing CUDA kernel image                         #
# --------------------------------------------------------------------------- #
@needs_native
def test_cpu_backward_is_deterministic_without_alert():
    """The CPU backward owns its grad_value slices (no atomics): allowed under
    torch.use_deterministic_algorithms(True) and bitwise reproducible. (The CUDA
    backward raises the alert: tests/test_ms_deform_attn_cuda.py.)"""
    inputs = make_inputs(1, 64, 2, 16, [(8, 6), (4, 3)], 4, torch.float32)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            first = grads(ms_deform_attn, *inputs)
            second = grads(ms_deform_attn, *inputs)
    finally:
        torch.use_deterministic_algorithms(before)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_fallback_when_no_cuda_kernel_image(monkeypatch):
    """A library built for other GPUs raises NotImplementedError ("... has no CUDA
    kernel image for this GPU ...", ms_deform_attn_cuda.cu) at the first launch:
    ms_deform_attn warns once, remembers the device and runs the reference. Emulated
    on the CPU by a native op that raises that error; other errors pass through."""
    calls = []

    def no_image(*args):
        calls.append(1)
        raise NotImplementedError(
            "ms_deform_attn: d2detr._C has no CUDA kernel image for this GPU (compute capability 7.5, "
            "no kernel image is available for execution on the device); rebuild it with TORCH_CUDA_ARCH_LIST=\"7.5\""
        )

    monkeypatch.setattr(msda, "_native_op", no_image)
    monkeypatch.setattr(msda, "_NATIVE", True)
    monkeypatch.setattr(msda, "_WARNED", False)
    monkeypatch.setattr(msda, "_NO_KERNEL_IMAGE", set())
    inputs = make_inputs(1, 4, 2, 4, [(3, 4), (2, 2)], 2)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out1 = msda.ms_deform_attn(*inputs)
        out2 = msda.ms_deform_attn(*inputs)
    msgs = [str(r.message) for r in rec if "native ms_deform_attn unavailable" in str(r.message)]
    assert len(msgs) == 1 and "TORCH_CUDA_ARCH_LIST" in msgs[0]
    assert len(calls) == 1 and msda._NO_KERNEL_IMAGE == {"cpu"}
    torch.testing.assert_close(out1, ms_deform_attn_reference(*inputs), rtol=0, atol=0)
    torch.testing.assert_close(out2, out1, rtol=0, atol=0)

    def other_error(*args):
        raise NotImplementedError("something else")

    monkeypatch.setattr(msda, "_native_op", other_error)
    monkeypatch.setattr(msda, "_NO_KERNEL_IMAGE", set())
    with pytest.raises(NotImplementedError, match="something else"):
        msda.ms_deform_attn(*inputs)


# --------------------------------------------------------------------------- #
# setup.py: default CUDA architectures                                         #
# --------------------------------------------------------------------------- #
def _setup_function(name):
    """A function of setup.py, compiled on its own (importing setup.py would run setup())."""
    import ast

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")
    with open(path) as f:
        tree = ast.parse(f.read())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    ns = {}
    exec(compile(ast.Module(body=[node], type_ignores=[]), path, "exec"), ns)
    return ns[name]


NVCC_13 = [(7, 5), (8, 0), (8, 6), (8, 7), (8, 8), (8, 9), (9, 0), (10, 0), (10, 3), (11, 0), (12, 0), (12, 1)]
NVCC_12_4 = [(5, 0), (5, 2), (5, 3), (6, 0), (6, 1), (6, 2), (7, 0), (7, 2), (7, 5), (8, 0), (8, 6), (8, 7), (8, 9),
             (9, 0)]


@pytest.mark.parametrize(
    "gpus,nvcc,expected",
    [
        ([], NVCC_13, "7.5;8.0;9.0+PTX"),  # no GPU, CUDA 13 (no Volta): T4, A100 (+8.x), H100, PTX for Blackwell
        ([], NVCC_12_4, "7.0;7.5;8.0;9.0+PTX"),  # CUDA 12 still has V100
        ([], None, "7.0;7.5;8.0;9.0+PTX"),
        ([(9, 0)], NVCC_13, "9.0+PTX"),  # H100 / H200
        ([(8, 6), (7, 5), (8, 6)], NVCC_13, "7.5;8.6+PTX"),
        ([(12, 0)], NVCC_12_4, "9.0+PTX"),  # a GPU newer than nvcc: the newest nvcc has, as PTX
        ([(7, 0)], NVCC_13, "7.5+PTX"),  # V100 with CUDA 13: nothing runs natively, said by the launch error
    ],
)
def test_default_cuda_arch_list(gpus, nvcc, expected):
    assert _setup_function("default_cuda_arch_list")(gpus, nvcc) == expected


def test_default_cuda_arch_list_is_understood_by_torch(monkeypatch):
    """torch turns the default into -gencode flags with SASS for each architecture
    and PTX (code=compute_90) for the newest."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", _setup_function("default_cuda_arch_list")([], NVCC_13))
    flags = cpp_extension._get_cuda_arch_flags()
    for sm in ("75", "80", "90"):
        assert f"-gencode=arch=compute_{sm},code=sm_{sm}" in flags
    assert "-gencode=arch=compute_90,code=compute_90" in flags


# --------------------------------------------------------------------------- #
# TorchScript, torch.export, torch.compile                                     #
# --------------------------------------------------------------------------- #
@needs_native
def test_jit_trace_save_load_in_fresh_process(tmp_path):
    m = _module()
    inputs = _module_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(m, inputs)
    assert "d2detr::ms_deform_attn" in str(traced.inlined_graph)
    path = tmp_path / "msda.pt"
    traced.save(str(path))
    expected = m(*inputs)
    torch.save({"inputs": inputs, "expected": expected}, tmp_path / "io.pt")
    # Only torch and the op library: d2detr is not importable in the child.
    script = textwrap.dedent(
        f"""
        import sys, torch
        torch.ops.load_library({get_library_path()!r})
        m = torch.jit.load({str(path)!r})
        io = torch.load({str(tmp_path / 'io.pt')!r})
        query, ref, value, shapes, starts = io["inputs"]
        query.requires_grad_(); value.requires_grad_()
        out = m(query, ref, value, shapes, starts)
        torch.testing.assert_close(out, io["expected"])
        out.sum().backward()  # autograd is registered in C++ as well
        assert query.grad is not None and value.grad.abs().sum() > 0
        assert "d2detr" not in sys.modules
        print("OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


@needs_native
def test_jit_script():
    m = _module()
    inputs = _module_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(m)
    torch.testing.assert_close(scripted(*inputs), m(*inputs))
    mask = torch.zeros(inputs[2].shape[:2], dtype=torch.bool)
    torch.testing.assert_close(scripted(*inputs, mask), m(*inputs, mask))


@needs_native
def test_torch_export(tmp_path):
    m = _module()
    inputs = _module_inputs()
    ep = torch.export.export(m, inputs)
    assert any("d2detr.ms_deform_attn" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(*inputs), m(*inputs))
    # dynamic number of queries
    q = torch.export.Dim("q", min=2, max=1024)
    ep = torch.export.export(m, inputs, dynamic_shapes=({1: q}, {1: q}, None, None, None))
    more = _module_inputs(Q=23, seed=3)
    torch.testing.assert_close(ep.module()(*more), m(*more))
    path = tmp_path / "msda.pt2"
    torch.export.save(ep, str(path))
    torch.testing.assert_close(torch.export.load(str(path)).module()(*more), m(*more))


@needs_native
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    m = _module().train()
    inputs = _module_inputs()
    compiled = torch.compile(m, fullgraph=True, backend=backend)
    out = compiled(*inputs)
    torch.testing.assert_close(out, m(*inputs), rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m(*inputs).square().sum().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)
