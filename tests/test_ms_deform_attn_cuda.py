"""CUDA kernels of d2detr::ms_deform_attn against the grid_sample reference.

Ground truth is ``ms_deform_attn_reference`` run in float64 (on the CPU, or on
the GPU for the large cases) on the *same* (already rounded) inputs, so the only
differences allowed are the kernel's own roundings: float32 accumulation and the
final cast to float16 / bfloat16. Skipped without a GPU. The location gradient at
pixel -1 is tested in tests/test_ms_deform_attn.py (CPU and CUDA alike);
scripts/device_check.sh runs this file, `-m slow` and compute-sanitizer included.
"""
import warnings

import pytest
import torch

from test_ms_deform_attn import RecordOpDtypes  # tests/ is on sys.path (pytest)

from d2detr.layers.ms_deform_attn import (
    MultiScaleDeformableAttention,
    ms_deform_attn,
    ms_deform_attn_reference,
    native_ms_deform_attn_available,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Max error allowed, relative to the largest reference magnitude, by result dtype.
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LEVELS = [(7, 11), (4, 6), (1, 3), (3, 1)]  # non-square, including 1-pixel-wide levels


@pytest.fixture(autouse=True)
def _require_cuda_kernel():
    # A GPU is present: a missing CUDA kernel is a build failure, not a skip.
    assert native_ms_deform_attn_available("cuda"), (
        "d2detr._C has no CUDA kernel for ms_deform_attn: rebuild with nvcc "
        "(CUDA_HOME=/usr/local/cuda python setup.py build_ext --inplace)"
    )


def make_inputs(N, Q, M, D, levels, P, dtype=torch.float32, wdtype=None, lo=-0.15, hi=1.15, seed=0, safe=False):
    """CPU inputs: value [N,S,M,D] in `dtype`, locations float32, weights in `wdtype`.

    safe=True keeps every pixel coordinate at least 0.05 px away from an integer,
    so float32 vs float64 rounding can never pick a different bilinear cell (the
    location gradient jumps there)."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.long).view(-1, 2)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cumsum(sizes, 0) - sizes
    S, L = int(sizes.sum()), shapes.shape[0]
    value = torch.randn(N, S, M, D, generator=g).to(dtype)
    loc = torch.rand(N, Q, M, L, P, 2, generator=g, dtype=torch.float64) * (hi - lo) + lo
    if safe:
        wh = torch.stack([shapes[:, 1], shapes[:, 0]], -1).double()[:, None, :]  # [L, 1, 2] (W, H)
        pix = loc * wh - 0.5
        base = torch.floor(pix)
        pix = base + 0.05 + 0.9 * (pix - base)
        loc = (pix + 0.5) / wh
    loc = loc.float()
    attn = torch.rand(N, Q, M, L, P, generator=g) + 0.05
    attn = (attn / attn.sum((-1, -2), keepdim=True)).to(wdtype or dtype)
    return value, shapes, starts, loc, attn


def to_cuda(*ts):
    return [t.cuda() for t in ts]


def reference(value, shapes, starts, loc, attn, grad_output=None, device="cpu"):
    """float64 reference (results on the CPU); with grad_output also its gradients."""
    v, l, a = (t.detach().to(device, torch.float64).requires_grad_(grad_output is not None)
               for t in (value, loc, attn))
    out = ms_deform_attn_reference(v, shapes.to(device), starts.to(device), l, a)
    if grad_output is None:
        return out.detach().cpu()
    out.backward(grad_output.detach().to(device, torch.float64))
    return tuple(t.detach().cpu() for t in (out, v.grad, l.grad, a.grad))


def assert_close(actual, expected, name, tol=None):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    tol = TOL[actual.dtype] if tol is None else tol
    a = actual.detach().cpu().double()
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    if expected.numel() == 0:
        return
    scale = max(expected.abs().max().item(), 1e-3)
    err = (a - expected).abs().max().item()
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol:.1g} * {scale:.3g} ({actual.dtype})"


RESULTS = ("out", "grad_value", "grad_sampling_locations", "grad_attention_weights")


def assert_all_close(actual, expected, names=RESULTS):
    for name, a, b in zip(names, actual, expected):
        assert_close(a, b, name)


# --------------------------------------------------------------------------- #
# Forward                                                                      #
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [1, 3, 8, 32, 71, 257])
def test_forward_matches_reference(dtype, D):
    value, shapes, starts, loc, attn = make_inputs(2, 13, 3, D, LEVELS, 3, dtype)
    out = ms_deform_attn(*to_cuda(value, shapes, starts, loc, attn))
    assert out.dtype == dtype and out.is_cuda
    assert_close(out, reference(value, shapes, starts, loc, attn), f"out D={D}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_float32_weights_with_low_precision_value(dtype):
    value, shapes, starts, loc, attn = make_inputs(2, 9, 2, 16, LEVELS, 4, dtype, wdtype=torch.float32)
    out = ms_deform_attn(*to_cuda(value, shapes, starts, loc, attn))
    assert out.dtype == dtype
    assert_close(out, reference(value, shapes, starts, loc, attn), "out")


def test_forward_borders_and_far_outside():
    """Exact borders (0, 1, half-pixel centres), points just outside, far outside."""
    levels = [(5, 8), (3, 2)]
    value, shapes, starts, _, attn = make_inputs(1, 6, 2, 4, levels, 8)
    special = torch.tensor([0.0, 1.0, 0.5 / 8, 1 - 0.5 / 8, -0.5 / 8, 1 + 0.5 / 8, -3.0, 7.0, -1e9, 1e9])
    g = torch.Generator().manual_seed(1)
    loc = special[torch.randint(len(special), (1, 6, 2, 2, 8, 2), generator=g)]
    loc[0, 0] = torch.rand(2, 2, 8, 2, generator=g)  # one ordinary query
    out = ms_deform_attn(*to_cuda(value, shapes, starts, loc, attn))
    assert_close(out, reference(value, shapes, starts, loc, attn), "out")


def test_forward_encoder_like_shape():
    """Deformable DETR encoder proportions (M=8, D=32, L=4, P=4, Q=S), scaled down."""
    levels = [(24, 36), (12, 18), (6, 9), (3, 5)]
    S = sum(h * w for h, w in levels)
    value, shapes, starts, loc, attn = make_inputs(2, S, 8, 32, levels, 4, lo=-0.05, hi=1.05, seed=3)
    out = ms_deform_attn(*to_cuda(value, shapes, starts, loc, attn))
    assert_close(out, reference(value, shapes, starts, loc, attn), "out")


def test_forward_matches_cpu_kernel():
    value, shapes, starts, loc, attn = make_inputs(2, 17, 4, 24, LEVELS, 4)
    cpu = torch.ops.d2detr.ms_deform_attn(value, shapes, starts, loc, attn)
    gpu = torch.ops.d2detr.ms_deform_attn(*to_cuda(value, shapes, starts, loc, attn))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)


def test_non_contiguous_and_misaligned_inputs():
    value, shapes, starts, loc, attn = make_inputs(2, 11, 3, 8, LEVELS, 3)
    v, s, st, l, a = to_cuda(value, shapes, starts, loc, attn)
    # value viewed through a permutation, and with a storage offset that breaks 16-byte alignment
    v_perm = v.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    buf = torch.empty(v.numel() + 1, device="cuda")
    v_shift = buf[1:].view_as(v).copy_(v)
    l_nc = torch.cat([l, l], dim=-1)[..., :2]
    a_nc = a.transpose(1, 2).contiguous().transpose(1, 2)
    expected = reference(value, shapes, starts, loc, attn)
    for vv in (v_perm, v_shift):
        assert_close(ms_deform_attn(vv, s, st, l_nc, a_nc), expected, "out")


# --------------------------------------------------------------------------- #
# Backward                                                                     #
# --------------------------------------------------------------------------- #
def run_backward(value, shapes, starts, loc, attn, grad_output):
    v, l, a = (t.cuda().requires_grad_() for t in (value, loc, attn))
    out = ms_deform_attn(v, shapes.cuda(), starts.cuda(), l, a)
    out.backward(grad_output.cuda())
    return out, v.grad, l.grad, a.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [1, 3, 32, 71, 257])
def test_backward_matches_reference(dtype, D):
    value, shapes, starts, loc, attn = make_inputs(2, 13, 3, D, LEVELS, 3, dtype, safe=True)
    go = torch.randn(2, 13, 3 * D, generator=torch.Generator().manual_seed(7)).to(dtype)
    out, gv, gl, ga = run_backward(value, shapes, starts, loc, attn, go)
    r_out, r_gv, r_gl, r_ga = reference(value, shapes, starts, loc, attn, go)
    assert (gv.dtype, gl.dtype, ga.dtype) == (dtype, torch.float32, dtype)
    assert_all_close((out, gv, gl, ga), (r_out, r_gv, r_gl, r_ga))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backward_float32_weights(dtype):
    value, shapes, starts, loc, attn = make_inputs(2, 9, 2, 16, LEVELS, 4, dtype, wdtype=torch.float32, safe=True)
    go = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(7)).to(dtype)
    _, gv, gl, ga = run_backward(value, shapes, starts, loc, attn, go)
    _, r_gv, r_gl, r_ga = reference(value, shapes, starts, loc, attn, go)
    assert (gv.dtype, gl.dtype, ga.dtype) == (dtype, torch.float32, torch.float32)
    assert_all_close((gv, gl, ga), (r_gv, r_gl, r_ga), RESULTS[1:])


@pytest.mark.parametrize("dtype,D", [(torch.float32, 256), (torch.float16, 520)])
def test_backward_op_direct_and_heavy_atomics(dtype, D):
    """The backward op itself, with many queries hitting the same few pixels
    (atomic contention) and more 16-byte chunks than lanes (2 or 3 per lane)."""
    levels = [(2, 3), (1, 2)]
    value, shapes, starts, loc, attn = make_inputs(2, 300, 2, D, levels, 4, dtype, safe=True)
    go = torch.randn(2, 300, 2 * D, generator=torch.Generator().manual_seed(7)).to(dtype)
    gv, gl, ga = torch.ops.d2detr.ms_deform_attn_backward(*to_cuda(value, shapes, starts, loc, attn, go))
    _, r_gv, r_gl, r_ga = reference(value, shapes, starts, loc, attn, go)
    assert_all_close((gv, gl, ga), (r_gv, r_gl, r_ga), RESULTS[1:])


def test_gradcheck_float64():
    value, shapes, starts, loc, attn = make_inputs(1, 3, 2, 3, [(3, 4), (2, 2)], 2, torch.float64, safe=True)
    v, s, st, l, a = to_cuda(value, shapes, starts, loc.double(), attn)
    v.requires_grad_()
    l.requires_grad_()
    a.requires_grad_()
    # grad_value is summed with atomics: the order (so the last bit) may vary between runs
    assert torch.autograd.gradcheck(
        lambda v, l, a: ms_deform_attn(v, s, st, l, a), (v, l, a), eps=1e-6, atol=1e-5, nondet_tol=1e-12
    )


# --------------------------------------------------------------------------- #
# Empty inputs, validation, streams, devices                                   #
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("N,Q,D,P", [(2, 0, 8, 2), (0, 5, 8, 2), (2, 5, 0, 2), (2, 5, 8, 0)])
def test_empty(N, Q, D, P):
    value, shapes, starts, loc, attn = make_inputs(N, Q, 3, D, LEVELS, P)
    v, s, st, l, a = to_cuda(value, shapes, starts, loc, attn)
    out = torch.ops.d2detr.ms_deform_attn(v, s, st, l, a)
    assert out.shape == (N, Q, 3 * D) and out.is_cuda
    assert out.numel() == 0 or bool((out == 0).all())
    gv, gl, ga = torch.ops.d2detr.ms_deform_attn_backward(v, s, st, l, a, torch.ones_like(out))
    assert gv.shape == v.shape and gl.shape == l.shape and ga.shape == a.shape
    for g in (gv, gl, ga):
        assert g.numel() == 0 or bool((g == 0).all())
    torch.cuda.synchronize()


MIXED = [  # value, sampling_locations, attention_weights
    (torch.float16, torch.float16, torch.float16),  # model.half() without autocast
    (torch.bfloat16, torch.bfloat16, torch.float16),
    (torch.float32, torch.float64, torch.bfloat16),
    (torch.float64, torch.float32, torch.float16),
]


@pytest.mark.parametrize("dtypes", MIXED, ids=lambda d: "-".join(str(t).split(".")[1] for t in d))
def test_mixed_dtypes(dtypes):
    """Any floating dtypes: locations are read as float32 (float64 with a float64
    value), weights in value's dtype or float32; output in value's dtype, each
    gradient in its input's; the Meta kernel agrees (opcheck's FakeTensor test)."""
    vt, lt, wt = dtypes
    value, shapes, starts, loc, attn = make_inputs(2, 9, 2, 16, LEVELS, 3, safe=True)
    value, attn = value.to(vt), attn.to(wt)
    loc_k = loc.to(lt).to(torch.float64 if vt == torch.float64 else torch.float32)  # what the kernel reads
    go = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(7)).to(vt)
    out, gv, gl, ga = run_backward(value, shapes, starts, loc.to(lt), attn, go)
    assert (out.dtype, gv.dtype, gl.dtype, ga.dtype) == (vt, vt, lt, wt)
    r_out, r_gv, r_gl, r_ga = reference(value, shapes, starts, loc_k, attn, go)
    lowest = max((vt, lt, wt), key=lambda t: TOL[t])
    for name, a, b in (("out", out, r_out), ("grad_value", gv, r_gv), ("grad_sampling_locations", gl, r_gl),
                       ("grad_attention_weights", ga, r_ga)):
        assert_close(a, b, name, tol=max(TOL[a.dtype], TOL[lowest] if name == "out" else TOL[vt]))
    args = [t.cuda() for t in (value, shapes, starts, loc.to(lt), attn)]
    for i in (0, 3, 4):
        args[i].requires_grad_()
    torch.library.opcheck(torch.ops.d2detr.ms_deform_attn.default, tuple(args),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(torch.ops.d2detr.ms_deform_attn_backward.default,
                          tuple(a.detach() for a in args) + (go.cuda(),), test_utils=("test_schema", "test_faketensor"))


def test_device_mismatch_rejected():
    value, shapes, starts, loc, attn = make_inputs(1, 4, 2, 8, LEVELS, 2, torch.float16)
    v, s, st, l, a = to_cuda(value, shapes, starts, loc, attn)
    with pytest.raises(ValueError, match="one device"):
        torch.ops.d2detr.ms_deform_attn(v, shapes, st, l, a)


@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("compute_in_float32", [False, True])
def test_module_under_autocast(amp_dtype, compute_in_float32):
    """Under CUDA autocast value stays in the autocast dtype (the float16 / bfloat16
    kernels run), locations and weights go to float32; compute_in_float32=True runs
    the op in float32 instead. Either way close to the float32 module."""
    torch.manual_seed(0)
    m = MultiScaleDeformableAttention(64, 4, 2, 2, compute_in_float32=compute_in_float32).cuda()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    levels = torch.tensor([[16, 12], [8, 6]], device="cuda")
    starts = torch.tensor([0, 192], device="cuda")
    query = torch.randn(2, 30, 64, device="cuda")
    ref_pts = torch.rand(2, 30, 2, 2, device="cuda")
    value = torch.randn(2, 240, 64, device="cuda", requires_grad=True)
    expected = m(query, ref_pts, value, levels, starts)
    (g_expected,) = torch.autograd.grad(expected.square().sum(), value)
    with torch.autocast("cuda", dtype=amp_dtype), RecordOpDtypes() as rec:
        out = m(query, ref_pts, value, levels, starts)
    assert rec.calls == [((torch.float32 if compute_in_float32 else amp_dtype), torch.float32, torch.float32)]
    assert out.dtype == amp_dtype
    (g,) = torch.autograd.grad(out.float().square().sum(), value)
    tol = 2e-2 if amp_dtype == torch.float16 else 6e-2
    assert_close(out, expected.detach().double().cpu(), "out", tol=tol)
    assert_close(g, g_expected.double().cpu(), "grad_value", tol=tol)


def test_backward_alerts_under_deterministic_algorithms():
    """grad_value is summed with atomics: like grid_sample's CUDA backward, the op
    calls PyTorch's non-determinism alert (an error, or a warning with warn_only)."""
    value, shapes, starts, loc, attn = make_inputs(1, 5, 2, 8, LEVELS, 2)
    go = torch.ones(1, 5, 16, device="cuda")
    args = to_cuda(value, shapes, starts, loc, attn)
    before = torch.are_deterministic_algorithms_enabled()
    warn_only_before = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        torch.ops.d2detr.ms_deform_attn(*args)  # the forward is deterministic
        with pytest.raises(RuntimeError, match="ms_deform_attn_backward_cuda does not have a deterministic"):
            torch.ops.d2detr.ms_deform_attn_backward(*args, go)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="ms_deform_attn_backward_cuda does not have a deterministic"):
            torch.ops.d2detr.ms_deform_attn_backward(*args, go)
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only_before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.ops.d2detr.ms_deform_attn_backward(*args, go)


def test_inconsistent_levels_read_no_out_of_bounds():
    """Level metadata that does not fit in value contributes zeros (checked on
    the device, no host sync) instead of reading out of bounds."""
    value, shapes, starts, loc, attn = make_inputs(1, 8, 2, 8, [(3, 4)], 2)
    v, _, _, l, a = to_cuda(value, shapes, starts, loc, attn)
    big = torch.tensor([[1000, 1000]], device="cuda")
    start = torch.zeros(1, dtype=torch.long, device="cuda")
    out = torch.ops.d2detr.ms_deform_attn(v, big, start, l, a)
    gv, gl, ga = torch.ops.d2detr.ms_deform_attn_backward(v, big, start, l, a, torch.ones_like(out))
    torch.cuda.synchronize()
    assert bool((out == 0).all()) and bool((gv == 0).all()) and bool((gl == 0).all())


def test_runs_on_current_stream_cuda_graph():
    """Captured in a CUDA graph (on torch's capture stream) and replayed on new data.
    A launch on any other stream fails the capture (legacy default stream) or is
    missing from the replay (any other), and a host sync fails the capture."""
    value, shapes, starts, loc, attn = make_inputs(2, 50, 4, 32, LEVELS, 4, safe=True)
    go = torch.randn(2, 50, 128, generator=torch.Generator().manual_seed(7))
    static = to_cuda(value, shapes, starts, loc, attn, go)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph asks
        torch.ops.d2detr.ms_deform_attn(*static[:5])
        torch.ops.d2detr.ms_deform_attn_backward(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.d2detr.ms_deform_attn(*static[:5])
        gv, gl, ga = torch.ops.d2detr.ms_deform_attn_backward(*static)
    new = make_inputs(2, 50, 4, 32, LEVELS, 4, safe=True, seed=5)
    new_go = torch.randn(2, 50, 128, generator=torch.Generator().manual_seed(8))
    for dst, src in zip(static, (*new, new_go)):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    r_out, r_gv, r_gl, r_ga = reference(*new, new_go)
    assert_all_close((out, gv, gl, ga), (r_out, r_gv, r_gl, r_ga))


def test_grid_stride_loops_more_than_once():
    """More (n, q, m, chunk) items than the grid has threads (grid_for caps it at 8
    waves of resident blocks), so every thread of both kernels loops several times."""
    props = torch.cuda.get_device_properties(0)
    grid_threads = props.multi_processor_count * (props.max_threads_per_multi_processor // 256) * 8 * 256
    N, M, D, P, levels = 2, 8, 32, 2, [(24, 20), (12, 10)]
    threads_per_query = M * 8  # forward: D / 4 float32 chunks; backward: G = 8 lanes per (n, q, m)
    Q = max(20000, -(-3 * grid_threads // (N * threads_per_query)))
    assert N * Q * threads_per_query > 2 * grid_threads
    value, shapes, starts, loc, attn = make_inputs(N, Q, M, D, levels, P, safe=True, seed=11)
    go = torch.randn(N, Q, M * D, generator=torch.Generator().manual_seed(12))
    out, gv, gl, ga = run_backward(value, shapes, starts, loc, attn, go)
    r_out, r_gv, r_gl, r_ga = reference(value, shapes, starts, loc, attn, go, device="cuda")
    assert_all_close((out, gv, gl, ga), (r_out, r_gv, r_gl, r_ga))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_non_contiguous_and_misaligned_grad_output(dtype):
    """The backward op on non-contiguous locations / weights and a grad_output one
    element past a 16-byte boundary (the vectorised path must not be taken)."""
    value, shapes, starts, loc, attn = make_inputs(2, 11, 3, 16, LEVELS, 3, dtype, safe=True)
    go = torch.randn(2, 11, 48, generator=torch.Generator().manual_seed(7)).to(dtype)
    v, s, st, l, a, g = to_cuda(value, shapes, starts, loc, attn, go)
    l_nc = torch.cat([l, l], dim=-1)[..., :2]
    a_nc = a.transpose(1, 2).contiguous().transpose(1, 2)
    buf = torch.empty(g.numel() + 1, device="cuda", dtype=dtype)
    g_mis = buf[1:].view_as(g).copy_(g)
    assert not (l_nc.is_contiguous() or a_nc.is_contiguous()) and g_mis.data_ptr() % 16 != 0
    gv, gl, ga = torch.ops.d2detr.ms_deform_attn_backward(v, s, st, l_nc, a_nc, g_mis)
    _, r_gv, r_gl, r_ga = reference(value, shapes, starts, loc, attn, go)
    assert_all_close((gv, gl, ga), (r_gv, r_gl, r_ga), RESULTS[1:])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    value, shapes, starts, loc, attn = make_inputs(2, 7, 2, 8, LEVELS, 2, safe=True)
    inputs = [t.to("cuda:1") for t in (value, shapes, starts, loc, attn)]
    out = torch.ops.d2detr.ms_deform_attn(*inputs)
    assert out.device == torch.device("cuda:1")
    assert_close(out, reference(value, shapes, starts, loc, attn), "out")


# --------------------------------------------------------------------------- #
# 64-bit indexing                                                              #
# --------------------------------------------------------------------------- #
@pytest.mark.slow
def test_64bit_indexing():
    """value with 2^32 elements (8 GiB in float16): offsets past 2^31 must not wrap.

    One level of 2^15 x 2^14 pixels, queries sampling its last rows; the reference
    runs on those rows cut out as a level of their own. Both levels have power-of-2
    sides and the locations are dyadic, so pixel coordinates are exact in both."""
    H, W, D, rows, Q, P = 2**15, 2**14, 8, 8, 64, 4
    need = H * W * D * (2 + 4 + 2) + (2 << 30)  # value, float32 grad buffer, float16 grad, slack
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory")
    g = torch.Generator().manual_seed(0)
    value = torch.randn(1, H * W, 1, D, device="cuda", dtype=torch.float16)
    crop = value[:, (H - rows) * W :].cpu()
    # pixel coordinates on a 1/16 grid: x anywhere, y in the last `rows` rows (and just below)
    px = torch.randint(-16, W * 16 + 16, (1, Q, 1, 1, P), generator=g).double() / 16
    py = (H - rows) + torch.randint(0, rows * 16 + 8, (1, Q, 1, 1, P), generator=g).double() / 16
    loc = torch.stack([(px + 0.5) / W, (py + 0.5) / H], -1).float()
    loc_crop = torch.stack([(px + 0.5) / W, (py - (H - rows) + 0.5) / rows], -1).float()
    attn = torch.rand(1, Q, 1, 1, P, generator=g).half()
    go = torch.randn(1, Q, D, generator=g).half()
    shapes = torch.tensor([[H, W]], device="cuda")
    starts = torch.zeros(1, dtype=torch.long, device="cuda")

    out = torch.ops.d2detr.ms_deform_attn(value, shapes, starts, loc.cuda(), attn.cuda())
    r_out, r_gv, r_gl, r_ga = reference(crop, torch.tensor([[rows, W]]), torch.zeros(1, dtype=torch.long),
                                        loc_crop, attn, go)
    assert_close(out, r_out, "out")

    gv, gl, ga = torch.ops.d2detr.ms_deform_attn_backward(value, shapes, starts, loc.cuda(), attn.cuda(), go.cuda())
    del value
    assert not bool(gv[:, : (H - rows) * W].any()), "grad_value written outside the sampled rows"
    assert_close(gv[:, (H - rows) * W :], r_gv, "grad_value")
    # loc_y_crop = (loc_y * H - (H - rows)) / rows  =>  d/dloc_y = H / rows * d/dloc_y_crop
    r_gl = r_gl * torch.tensor([1.0, H / rows], dtype=torch.float64)
    assert_close(gl, r_gl, "grad_sampling_locations")
    assert_close(ga, r_ga, "grad_attention_weights")
