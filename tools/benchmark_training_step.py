#!/usr/bin/env python
"""Where a CPU training step of a config goes, and what cheap changes buy, measured side by side.

    python tools/benchmark_training_step.py                      # the demo recipe, 2 threads
    python tools/benchmark_training_step.py --variants fp32,bf16 --steps 6 --threads 1
    python tools/benchmark_training_step.py --config-file configs/neon_trees/faster_rcnn_mobilenetv2_fpn.py --variants fp32

A step is what ``d2detr.engine.DetrTrainer`` runs: forward + loss, backward, gradient clipping,
optimizer step, on batches of the config's own training loader (the first ``--batches`` batches,
drawn once and reused, so every variant sees the same images). Steps are timed with the process
CPU clock divided by the threads (``time.process_time() / threads``, what the time budget's
"process" clock counts; robust to other jobs on a shared machine) and with the wall clock.
Variants run round-robin, one step each per round, so a change of load hits them alike; the
median over ``--steps`` rounds is reported after ``--warmup`` rounds.

Variants (``--variants``, comma-separated):

* ``fp32``: the config as is;
* ``bf16``: ``torch.autocast("cpu", bfloat16)`` around forward + loss (``train.amp.enabled=True``;
  useful only where the CPU has native bf16 matmuls, AVX512-BF16 / AMX);
* ``channels_last``: the backbone's weights and input in ``torch.channels_last`` memory format;
* ``bf16_channels_last``: both.

Then one step of ``--profile`` (default: the first variant) under ``torch.profiler`` is broken
down by op category (dense matmuls, convolutions, the deformable-attention op, normalisation,
element-wise, indexing/copies, the optimizer, other) by the ops' self CPU time.
"""
import argparse
import json
import os
import statistics
import sys
import time
from collections import OrderedDict
from typing import Dict, List

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

DEFAULT_CONFIG = os.path.join(_REPO, "configs", "neon_trees", "dino_recipe.py")
VARIANTS = ("fp32", "bf16", "channels_last", "bf16_channels_last")

#: category -> substrings of aten / custom op names (first match wins, in this order).
CATEGORIES = OrderedDict(
    [
        ("deformable attention op", ("ms_deform", "d2detr::")),
        ("convolution", ("conv", "mkldnn_convolution")),
        ("dense matmul", ("addmm", "aten::mm", "bmm", "matmul", "linear", "baddbmm", "aten::_addmm")),
        ("optimizer", ("_foreach", "adam", "sgd", "lerp")),
        ("normalisation", ("norm", "frozen")),
        ("indexing / copies", ("copy", "index", "gather", "scatter", "cat", "stack", "to_copy", "clone",
                               "contiguous", "select", "slice", "masked", "where", "nonzero", "sort", "topk")),
        ("element-wise", ("add", "mul", "sub", "div", "sigmoid", "relu", "exp", "log", "pow", "sqrt", "clamp",
                          "tanh", "neg", "abs", "max", "min", "sum", "mean", "softmax", "hardtanh", "gelu",
                          "threshold", "fill", "zero", "ne", "eq", "lt", "gt", "ge", "le", "rsub", "reciprocal")),
    ]
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=DEFAULT_CONFIG)
    p.add_argument("--variants", default="fp32,bf16,channels_last", help=f"subset of {', '.join(VARIANTS)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="timed rounds (default %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default %(default)s)")
    p.add_argument("--batches", type=int, default=4, help="distinct batches, cycled (default %(default)s)")
    p.add_argument("--profile", default=None, help="variant to profile (default: the first; 'none' skips)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides key=value")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or not args.variants:
        p.error(f"--variants: unknown {bad}; choose from {', '.join(VARIANTS)}")
    if args.steps < 1 or args.warmup < 0 or args.batches < 1 or args.threads < 1:
        p.error("--steps, --batches and --threads must be >= 1, --warmup >= 0")
    args.profile = args.profile or args.variants[0]
    if args.profile != "none" and args.profile not in args.variants:
        p.error(f"--profile must be one of --variants or 'none', got {args.profile!r}")
    args.opts = [o for o in args.opts if o != "--"]
    return args


def category_of(op_name: str) -> str:
    name = op_name.lower()
    for cat, keys in CATEGORIES.items():
        if any(k in name for k in keys):
            return cat
    return "other"


class Variant:
    """One model + optimizer + trainer settings, trained from the same initial weights."""

    def __init__(self, name, cfg, state, batches):
        import torch
        from detectron2.config import instantiate

        from d2detr.engine.defaults import build_trainer

        self.name = name
        torch.manual_seed(0)
        self.model = instantiate(cfg.model)
        self.model.load_state_dict(state)
        self.model.train()
        self.channels_last = "channels_last" in name
        if self.channels_last:
            self.model.backbone.to(memory_format=torch.channels_last)
            self._wrap_backbone_input()
        cfg.optimizer.params.model = self.model
        optimizer = instantiate(cfg.optimizer)
        self.trainer = build_trainer(cfg, self.model, iter(()), optimizer)
        self.trainer.amp = name.startswith("bf16")
        self.trainer.amp_dtype = torch.bfloat16
        self.batches = batches
        self.cpu_s: List[float] = []
        self.wall_s: List[float] = []
        self.losses: List[float] = []

    def _wrap_backbone_input(self):
        import torch

        backbone = self.model.backbone
        bottom = getattr(backbone, "bottom_up", backbone)
        forward = bottom.forward

        def forward_cl(x, _forward=forward):
            return _forward(x.contiguous(memory_format=torch.channels_last))

        bottom.forward = forward_cl

    def step(self, i, threads):
        from detectron2.utils.events import EventStorage

        self.trainer._data_loader_iter_obj = iter([self.batches[i % len(self.batches)]])
        with EventStorage(i) as storage:
            self.trainer.storage = storage
            self.trainer.iter = i
            c0, w0 = time.process_time(), time.perf_counter()
            self.trainer.run_step()
            c1, w1 = time.process_time(), time.perf_counter()
            total = storage.latest().get("total_loss")
        return (c1 - c0) / threads, w1 - w0, float(total[0]) if total else float("nan")


def profile_step(variant, threads) -> Dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        variant.step(10**6, threads)
    by_cat: Dict[str, float] = {}
    for evt in prof.key_averages():
        if evt.key.startswith("ProfilerStep") or evt.key.startswith("autograd::engine::evaluate_function"):
            continue
        by_cat[category_of(evt.key)] = by_cat.get(category_of(evt.key), 0.0) + evt.self_cpu_time_total / 1e6
    return by_cat


def main(argv=None):
    args = parse_args(argv)
    import torch
    from detectron2.config import LazyConfig, instantiate

    torch.set_num_threads(args.threads)
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts + ["dataloader.train.num_workers=0"])
    torch.manual_seed(0)
    state = instantiate(cfg.model).state_dict()
    loader = iter(instantiate(cfg.dataloader.train))
    batches = [next(loader) for _ in range(args.batches)]
    variants = [Variant(v, cfg, state, batches) for v in args.variants]

    for r in range(args.warmup + args.steps):
        for v in variants:
            cpu, wall, loss = v.step(r, args.threads)
            if r >= args.warmup:
                v.cpu_s.append(cpu)
                v.wall_s.append(wall)
            v.losses.append(loss)

    base = statistics.median(variants[0].cpu_s)
    rows = []
    print(f"\n{os.path.relpath(args.config_file, _REPO)}: training step (batch {len(batches[0])}), "
          f"{args.threads} threads, median of {args.steps} rounds after {args.warmup} warm-up; "
          f"load {os.getloadavg()[0]:.1f}")
    print("| variant | CPU s / step (process / threads) | wall s / step | vs first | loss after the run |")
    print("|---|---:|---:|---:|---:|")
    for v in variants:
        cpu, wall = statistics.median(v.cpu_s), statistics.median(v.wall_s)
        rows.append({"variant": v.name, "cpu_s": cpu, "wall_s": wall, "ratio": cpu / base, "losses": v.losses})
        print(f"| {v.name} | {cpu:.3f} | {wall:.3f} | {cpu / base:.2f}x | {v.losses[-1]:.3f} |")

    result = {"config": os.path.relpath(args.config_file, _REPO), "threads": args.threads, "steps": args.steps,
              "warmup": args.warmup, "opts": args.opts, "variants": rows, "loadavg": os.getloadavg(),
              "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.profile != "none":
        v = next(v for v in variants if v.name == args.profile)
        by_cat = profile_step(v, args.threads)
        total = sum(by_cat.values())
        print(f"\nOne {v.name} step by op category (self CPU time of the ops, all threads; total {total:.2f} s):")
        print("| category | s | share |")
        print("|---|---:|---:|")
        for cat, s in sorted(by_cat.items(), key=lambda kv: -kv[1]):
            print(f"| {cat} | {s:.3f} | {100 * s / total:.0f} % |")
        result["profile"] = {"variant": v.name, "by_category_s": by_cat}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
