#!/usr/bin/env python
"""What DEQDet's single loss dict costs in memory, against the official in-loss backward.

    python tools/benchmark_deqdet_memory.py                      # DEQDet R50, one 512x512 image, CPU
    python tools/benchmark_deqdet_memory.py --height 800 --width 1216 --threads 2
    python tools/benchmark_deqdet_memory.py --config-file configs/neon_trees/deqdet_mobilenetv2.py --height 416 --width 416

One training step (forward + every backward) in three formulations, each in a fresh process:

* ``single``: d2detr's: every loss in the one dict, one ``backward()`` (all RAG graphs alive until then);
* ``checkpoint``: the same with ``model.checkpoint_refinement=True`` (the supervised refinement steps
  recomputed in the backward pass);
* ``in_loss``: the official ``MCG-NJU/DEQDet`` formulation (``in_loss_backward_step``): each RAG
  loss back-propagated as soon as it is computed.

Peak memory = the peak during the measured step minus the memory before it (CPU: resident set
size, CUDA: ``max_memory_allocated``), measured on the second step so that the gradient buffers
exist already: the activations the formulation keeps. On the CPU the workers run with glibc's
mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``), so that freed tensors leave the
resident set at once instead of staying cached by malloc and hiding the second step's peak. Random weights; one image with 10 boxes;
the RAP perturbations use the same seed in every formulation.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

DEFAULT_CONFIG = os.path.join(_REPO, "projects", "deqdet", "configs", "models", "deqdet_r50.py")
MODES = ("single", "checkpoint", "in_loss")


def _benchmark_tool():
    """tools/benchmark.py: its inputs and its peak-memory meter."""
    spec = importlib.util.spec_from_file_location("d2detr_benchmark", os.path.join(_REPO, "tools", "benchmark.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=DEFAULT_CONFIG, help="a DEQDet config with a `model` (default: R50)")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides key=value")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    if any(m not in MODES for m in args.modes):
        p.error(f"--modes: choose from {', '.join(MODES)}")
    args.opts = [o for o in args.opts if o != "--"]
    return args


def run_worker(args):
    import torch

    from d2detr.projects.deqdet.modeling import DEQDet, in_loss_backward_step

    bench = _benchmark_tool()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    opts = list(args.opts) + (["model.checkpoint_refinement=True"] if args.worker == "checkpoint" else [])
    model = bench.build_ours(args.config_file, opts).to(args.device).train()
    if not isinstance(model, DEQDet):
        raise SystemExit(f"{args.config_file} builds a {type(model).__name__}, not a DEQDet")
    image, boxes, labels = bench.make_inputs(args.height, args.width, model.num_classes, args.device)
    batch = bench.ours_batch(image, boxes, labels, train=True)

    def step():
        torch.manual_seed(1)
        model.zero_grad(set_to_none=False)
        if args.worker == "in_loss":
            in_loss_backward_step(model, batch)
        else:
            sum(model(batch).values()).backward()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    step()  # creates the gradient buffers
    start = time.perf_counter()
    with bench._PeakMemory(args.device) as mem:
        step()
    seconds = time.perf_counter() - start
    print("RESULT " + json.dumps({"mode": args.worker, "peak_bytes": mem.peak, "seconds": seconds}), flush=True)


def measure(args, mode):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--config-file", args.config_file,
           "--height", str(args.height), "--width", str(args.width), "--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run(cmd + list(args.opts), capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"worker {mode} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    results = [measure(args, mode) for mode in args.modes]
    base = next((r["peak_bytes"] for r in results if r["mode"] == "in_loss"), None)
    print(f"\nDEQDet training step, {os.path.relpath(args.config_file, _REPO)}, one {args.height}x{args.width} image, "
          f"{args.device}{f', {args.threads} threads' if args.threads else ''}")
    print("| formulation | peak memory (MiB) | vs in-loss backward | step time (s) |")
    print("|---|---:|---:|---:|")
    names = {"single": "single loss dict (d2detr)", "checkpoint": "single loss dict + checkpoint_refinement",
             "in_loss": "in-loss backward (official)"}
    for r in results:
        ratio = f"{r['peak_bytes'] / base:.2f}x" if base else "-"
        print(f"| {names[r['mode']]} | {r['peak_bytes'] / 2**20:.0f} | {ratio} | {r['seconds']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config_file, "height": args.height, "width": args.width, "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
