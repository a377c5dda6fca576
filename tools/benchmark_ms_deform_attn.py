#!/usr/bin/env python
"""Benchmark d2detr's native ms_deform_attn against the grid_sample reference.

Prints a markdown table (paste it into the README): median wall time and peak
memory of the forward and of forward+backward, for
  (a) the Deformable DETR encoder of a 512x512 image: levels at strides
      8/16/32/64 -> (64,64),(32,32),(16,16),(8,8), S = Q = 5440, M=8, D=32, P=4;
  (b) the decoder on the same value: Q = 300.
Sampling locations are uniform in [0, 1) (the least cache-friendly case),
attention weights softmax-normalised over L*P.

Peak memory is what the call allocates on top of its inputs (outputs and
gradients included): the profiler's allocation trace on the CPU,
torch.cuda.max_memory_allocated on CUDA. On CUDA the table also gives the
fraction of the bytes-moved floor achieved: the time to read value, locations
and weights and write the output once (forward; plus reading them and the
output gradient and writing the three gradients once, for forward+backward) at
the device's measured copy bandwidth, divided by the measured time.

    python tools/benchmark_ms_deform_attn.py                       # CPU, float32
    python tools/benchmark_ms_deform_attn.py --device cuda --dtype float16
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from d2detr.layers.ms_deform_attn import (  # noqa: E402
    ms_deform_attn,
    ms_deform_attn_reference,
    native_ms_deform_attn_available,
)

LEVELS = [(64, 64), (32, 32), (16, 16), (8, 8)]
# Strides 8/16/32/64 of an 800x1333 image: S = 22 223 (the standard GPU encoder shape, N=2).
LEVELS_800x1333 = [(100, 167), (50, 84), (25, 42), (13, 21)]
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_inputs(Q, device, dtype, N=1, M=8, D=32, P=4, seed=0, levels=LEVELS):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.long)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cumsum(sizes, 0) - sizes
    S, L = int(sizes.sum()), len(levels)
    value = torch.randn(N, S, M, D, generator=g)
    loc = torch.rand(N, Q, M, L, P, 2, generator=g)
    weights = torch.randn(N, Q, M, L * P, generator=g).softmax(-1).view(N, Q, M, L, P)
    # Half-precision kernels take float32 locations; everything else uses one dtype.
    loc_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return (
        value.to(device, dtype),
        shapes.to(device),
        starts.to(device),
        loc.to(device, loc_dtype),
        weights.to(device, dtype),
    )


def reference(value, shapes, starts, loc, weights):
    return ms_deform_attn_reference(value, shapes, starts, loc.to(value.dtype), weights)


def native(value, shapes, starts, loc, weights):
    return torch.ops.d2detr.ms_deform_attn(value, shapes, starts, loc, weights)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(fn, inputs, backward):
    value, shapes, starts, loc, weights = inputs
    if not backward:
        def step():
            with torch.no_grad():
                return fn(value, shapes, starts, loc, weights)
        return step
    v, l, w = (t.detach().clone().requires_grad_() for t in (value, loc, weights))
    grad = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], device=value.device,
                       dtype=value.dtype)

    def step():
        out = fn(v, shapes, starts, l, w)
        gv, gl, gw = torch.autograd.grad(out, (v, l, w), grad)
        return gv
    return step


def time_ms(step, device, repeat, warmup):
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(repeat):
        _sync(device)
        t = time.perf_counter()
        out = step()
        _sync(device)
        times.append((time.perf_counter() - t) * 1e3)
        del out
    return statistics.median(times)


def peak_mb(step, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = step()
        del out
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.remove(path)
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0]
    return max(totals, default=0) / 2**20


def floor_bytes(inputs, backward):
    value, _, _, loc, weights = inputs
    out_bytes = value.shape[0] * loc.shape[1] * value.shape[2] * value.shape[3] * value.element_size()
    fwd = sum(t.numel() * t.element_size() for t in (value, loc, weights)) + out_bytes
    if not backward:
        return fwd
    # backward reads value, locations, weights and grad_output, writes three gradients
    return fwd + 2 * sum(t.numel() * t.element_size() for t in (value, loc, weights)) + out_bytes


def copy_bandwidth(device):
    """Measured device-to-device copy bandwidth in bytes/s (read + write)."""
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    n = 20
    for _ in range(n):
        y.copy_(x)
    torch.cuda.synchronize(device)
    return 2 * x.numel() * n / (time.perf_counter() - t)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per cell (default 20 native, 5 reference)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device available")
    if not native_ms_deform_attn_available(device.type):
        ap.error(f"the native op has no {device.type} kernel: build it with `python setup.py build_ext --inplace`")
    if device.type == "cpu" and dtype not in (torch.float32, torch.float64):
        ap.error("the CPU kernels support float32 and float64")

    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
        bw = copy_bandwidth(device)
    else:
        dev_name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        bw = None

    impls = [("native", native)] + ([] if args.skip_reference else [("reference", reference)])
    cases = [("(a) encoder", 5440, 1, LEVELS), ("(b) decoder", 300, 1, LEVELS)]
    if device.type == "cuda":
        cases.append(("(c) encoder 800x1333, N=2", 22223, 2, LEVELS_800x1333))
    rows = []
    for case, Q, N, levels in cases:
        inputs = make_inputs(Q, device, dtype, N=N, levels=levels)
        res = {}
        for name, fn in impls:
            repeat = args.repeat or (20 if name == "native" else 5)
            r = {}
            for bwd in (False, True):
                step = make_step(fn, inputs, bwd)
                r[("ms", bwd)] = time_ms(step, device, repeat, args.warmup)
                r[("mb", bwd)] = peak_mb(step, device)
                if bw:
                    r[("floor", bwd)] = floor_bytes(inputs, bwd) / bw * 1e3 / r[("ms", bwd)]
            res[name] = r
        rows.append((case, Q, res))

    print(f"ms_deform_attn, {device.type} ({dev_name}), {args.dtype}; torch {torch.__version__}; "
          f"N=1, levels {LEVELS} (c: N=2, levels {LEVELS_800x1333}), M=8, D=32, P=4; median of timed runs")
    if bw:
        print(f"measured copy bandwidth: {bw / 1e9:.0f} GB/s")
    print()
    head = "| shape | Q | impl | fwd ms | fwd peak MB | fwd+bwd ms | fwd+bwd peak MB |"
    sep = "|---|---:|---|---:|---:|---:|---:|"
    if bw:
        head += " fwd % of floor | fwd+bwd % of floor |"
        sep += "---:|---:|"
    if not args.skip_reference:
        head += " speed-up fwd | speed-up fwd+bwd |"
        sep += "---:|---:|"
    print(head)
    print(sep)
    for case, Q, res in rows:
        for name, _ in impls:
            r = res[name]
            line = (f"| {case} | {Q} | {name} | {r[('ms', False)]:.2f} | {r[('mb', False)]:.1f} | "
                    f"{r[('ms', True)]:.2f} | {r[('mb', True)]:.1f} |")
            if bw:
                line += f" {100 * r[('floor', False)]:.0f}% | {100 * r[('floor', True)]:.0f}% |"
            if not args.skip_reference:
                ref = res["reference"]
                if name == "native":
                    line += (f" {ref[('ms', False)] / r[('ms', False)]:.1f}x |"
                             f" {ref[('ms', True)] / r[('ms', True)]:.1f}x |")
                else:
                    line += " 1.0x | 1.0x |"
            print(line)


if __name__ == "__main__":
    main()
