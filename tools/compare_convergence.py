#!/usr/bin/env python
"""Convergence of the DETR-family methods on real data: COCO AP on ``neon_trees_val``
against training iterations, all methods in one figure.

    # the committed figure (docs/convergence_neon_trees.png, docs/convergence.md), ~45 min:
    python tools/compare_convergence.py --max-iter 500 --eval-period 50 \\
        --figure docs/convergence_neon_trees.png --json docs/convergence_neon_trees.json
    # two methods, a few iterations (the test does this):
    python tools/compare_convergence.py --methods detr,dab_detr --max-iter 2 --eval-period 2 --output /tmp/cc
    # redraw the figure from the JSON without training:
    python tools/compare_convergence.py --plot-only --json docs/convergence_neon_trees.json \\
        --figure docs/convergence_neon_trees.png

Each method trains its config ``configs/neon_trees/<method>_mobilenetv2.py`` through
``d2detr.engine.do_train`` (the loop behind ``tools/train_net.py``) with Detectron2's
``COCOEvaluator`` on ``neon_trees_val`` every ``--eval-period`` iterations and after the
last one. The configs share everything but the model (``configs/neon_trees/common.py``):
the ImageNet MobileNetV2 backbone (offline weights), d_model 128, 2+2 layers, FFN 512,
100 queries, input sizes, batch 2, AdamW lr 2e-4 with the methods' own lr factors, the LR
schedule (warmup, x0.1 at 80 %), gradient clipping and the seed; the data loader runs in
the main process so every method sees the same images, flips and sizes in the same order.
Rows of one method's ablation share its config and differ by ``METHOD_OVERRIDES`` (SD-DETR).

Methods run one after the other in this process. The curves go to ``--json`` after each
method (and the figure is redrawn), so an interrupted comparison keeps what finished;
re-running the same command skips the methods already in the JSON with the same settings
(``--fresh`` retrains everything).
"""
import argparse
import json
import logging
import os
import sys
import time
from typing import Dict, List, Optional

# Allow running from a source checkout without installing d2detr.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

from d2detr.utils import command_line, load_results, save_results  # noqa: E402  (re-exported for the tests)

#: Method name -> (config file, label in the figure), in the order the papers build on each other.
METHODS = {
    "detr": ("configs/neon_trees/detr_mobilenetv2.py", "DETR"),
    "conditional_detr": ("configs/neon_trees/conditional_detr_mobilenetv2.py", "Conditional DETR"),
    "dab_detr": ("configs/neon_trees/dab_detr_mobilenetv2.py", "DAB-DETR"),
    "deformable_detr": ("configs/neon_trees/deformable_detr_mobilenetv2.py", "Deformable DETR"),
    "dab_deformable_detr": ("configs/neon_trees/dab_deformable_detr_mobilenetv2.py", "DAB-Deformable-DETR"),
    "dino": ("configs/neon_trees/dino_mobilenetv2.py", "DINO"),
    "focus_detr": ("configs/neon_trees/focus_detr_mobilenetv2.py", "Focus-DETR"),
    # SD-DETR's ablation (paper Table 2), row by row: one config, the rows differ by METHOD_OVERRIDES
    "sd_detr_baseline": ("configs/neon_trees/sd_detr_mobilenetv2.py", "SD-DETR baseline (Cond. DETR + mini-detector)"),
    "sd_detr_dfl": ("configs/neon_trees/sd_detr_mobilenetv2.py", "+ decoupled feature learning"),
    "sd_detr_taq": ("configs/neon_trees/sd_detr_mobilenetv2.py", "+ task-aware queries"),
    "sd_detr": ("configs/neon_trees/sd_detr_mobilenetv2.py", "SD-DETR (+ alignment loss)"),
    "adamixer": ("configs/neon_trees/adamixer_mobilenetv2.py", "AdaMixer"),
    "rnndet": ("configs/neon_trees/rnndet_mobilenetv2.py", "RNNDet"),
    "deqdet": ("configs/neon_trees/deqdet_mobilenetv2.py", "DEQDet"),
}
#: Method name -> config overrides applied before the command line's (methods that share a config).
_NO_TAQ = "model.transformer.task_aware_queries=False"
_NO_ALIGN = "model.criterion.alignment_loss=False"
METHOD_OVERRIDES = {
    "sd_detr_baseline": ["model.transformer.decoupling=none", _NO_TAQ, _NO_ALIGN],
    "sd_detr_dfl": [_NO_TAQ, _NO_ALIGN],
    "sd_detr_taq": [_NO_ALIGN],
}
COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
#: Settings that must match for a method's stored curve to be reused instead of retrained.
_SETTING_KEYS = ("max_iter", "eval_period", "seed", "opts")

logger = logging.getLogger("d2detr.compare_convergence")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {', '.join(METHODS)} (default: all)")
    p.add_argument("--max-iter", type=int, default=500, help="training iterations per method (default %(default)s)")
    p.add_argument("--eval-period", type=int, default=50,
                   help="COCO evaluation every N iterations, and after the last (default %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="train.seed for every method (default %(default)s)")
    p.add_argument("--num-threads", type=int, default=1,
                   help="torch.set_num_threads (default %(default)s: on a shared 2-core machine one thread "
                        "per process trained 5-10x faster than two)")
    p.add_argument("--output", default=os.path.join("output", "convergence"),
                   help="work folder: one training folder per method, and the JSON/PNG unless given (default %(default)s)")
    p.add_argument("--json", default=None, help="curves JSON (default <output>/convergence.json)")
    p.add_argument("--figure", default=None, help="PNG figure (default <output>/convergence.png)")
    p.add_argument("--fresh", action="store_true", help="retrain methods already in the JSON")
    p.add_argument("--plot-only", action="store_true", help="only redraw the figure from the JSON")
    p.add_argument("opts", nargs=argparse.REMAINDER,
                   help="config overrides key=value applied to every method, e.g. train.clip_grad.enabled=False")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        p.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    if args.max_iter < 1:
        p.error("--max-iter must be >= 1")
    if args.eval_period < 1:
        p.error("--eval-period must be >= 1")
    args.opts = [o for o in args.opts if o != "--"]
    args.json = args.json or os.path.join(args.output, "convergence.json")
    args.figure = args.figure or os.path.join(args.output, "convergence.png")
    return args


# ---------------------------------------------------------------------------------- training


def train_one(method: str, args) -> Dict:
    """Trains one method with the shared settings; returns its curve and timings."""
    import torch
    from detectron2.config import LazyConfig
    from detectron2.engine import default_argument_parser
    from detectron2.utils.env import seed_all_rng

    from d2detr.engine import do_train

    config_file = os.path.join(_REPO, METHODS[method][0])
    out_dir = os.path.join(args.output, method)
    opts = [
        f"train.max_iter={args.max_iter}",
        f"train.eval_period={args.eval_period}",
        f"train.seed={args.seed}",
        f"train.output_dir={out_dir}",
        "train.device=cpu",
        f"train.checkpointer.period={args.max_iter + 1}",  # curves only: no intermediate checkpoints
    ] + METHOD_OVERRIDES.get(method, []) + list(args.opts)
    cfg = LazyConfig.apply_overrides(LazyConfig.load(config_file), opts)
    os.makedirs(out_dir, exist_ok=True)
    LazyConfig.save(cfg, os.path.join(out_dir, "config.yaml"))
    # What default_setup does that matters here: the seed (same for every method).
    seed_all_rng(args.seed)
    torch.set_num_threads(args.num_threads)
    train_args = default_argument_parser().parse_args(["--config-file", config_file])

    start = time.perf_counter()
    trainer = do_train(train_args, cfg)
    wall_s = time.perf_counter() - start

    storage = trainer.storage
    curve: Dict[str, List[float]] = {}
    iterations: Optional[List[int]] = None
    for key in COCO_KEYS:
        name = f"bbox/{key}"
        if name not in storage.histories():
            continue
        # [(value, storage iter)]: a periodic evaluation runs after step `it` (0-based), i.e. after
        # it + 1 iterations; the one after training runs once the storage has stepped to max_iter.
        values = storage.history(name).values()
        if iterations is None:
            iterations = [min(int(it) + 1, args.max_iter) for _, it in values]
        curve[key] = [float(v) for v, _ in values]
    if iterations is None:
        raise RuntimeError(f"{method}: no COCO evaluation results were recorded")
    step_times = storage.history("time").values() if "time" in storage.histories() else []
    # Detectron2's IterationTimer skips the first iterations' times in its summary; use the median.
    step_s = sorted(v for v, _ in step_times)
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    return {
        "label": METHODS[method][1],
        "config": METHODS[method][0],
        "overrides": METHOD_OVERRIDES.get(method, []),
        "iterations": iterations,
        **curve,
        "final_loss": float(storage.history("total_loss").latest()) if "total_loss" in storage.histories() else None,
        "wall_seconds": round(wall_s, 1),
        "median_seconds_per_iter": round(step_s[len(step_s) // 2], 3) if step_s else None,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "max_iter": args.max_iter,
        "eval_period": args.eval_period,
        "seed": args.seed,
        "opts": list(args.opts),
        "num_threads": args.num_threads,
    }


# ----------------------------------------------------------------------------------- results


def _ordered(methods: Dict) -> List[str]:
    return [m for m in METHODS if m in methods] + [m for m in methods if m not in METHODS]


def plot(results: Dict, path: str) -> str:
    """AP (left) and AP50 (right) on neon_trees_val against iterations, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"detr": ("tab:gray", "o"), "conditional_detr": ("tab:blue", "s"), "dab_detr": ("tab:green", "^"),
              "deformable_detr": ("tab:orange", "D"), "dab_deformable_detr": ("tab:red", "v"),
              "sd_detr_baseline": ("tab:purple", "x"), "sd_detr_dfl": ("tab:purple", "+"),
              "sd_detr_taq": ("tab:pink", "P"), "sd_detr": ("tab:brown", "*"),
              "adamixer": ("tab:olive", "P"), "rnndet": ("tab:cyan", "X"), "deqdet": ("black", "*")}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    methods = results["methods"]
    for key, ax in zip(("AP", "AP50"), axes):
        for m in _ordered(methods):
            r = methods[m]
            if key not in r:
                continue
            color, marker = styles.get(m, (None, "o"))
            ax.plot(r["iterations"], r[key], marker=marker, color=color, label=r.get("label", m), lw=1.8, ms=5)
        max_iter = max((r.get("max_iter", 0) for r in methods.values()), default=0)
        if max_iter:  # the common schedule drops the learning rate x0.1 at 80 % of max_iter
            ax.axvline(0.8 * max_iter, color="k", ls=":", lw=1)
            ax.text(0.8 * max_iter, 0.98, " lr x0.1", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
        ax.set_xlabel("training iteration (batch 2; 33 iterations = one pass over the 66 training tiles)")
        ax.set_ylabel(f"{key} on neon_trees_val")
        ax.set_ylim(bottom=0)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper left", fontsize=9)
    any_r = next(iter(methods.values()), {})
    fig.suptitle(
        "Convergence on NEON tree crowns (real aerial tiles, 1 class): same MobileNetV2 backbone, "
        f"d_model 128, 2+2 layers, 100 queries, seed {any_r.get('seed', '?')}, CPU",
        fontsize=10,
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def format_table(results: Dict, key: str = "AP", digits: int = 2) -> str:
    """Markdown table: one row per method, one column per evaluation iteration."""
    methods = results["methods"]
    iters = sorted({it for r in methods.values() for it in r["iterations"]})
    lines = ["| method | " + " | ".join(str(i) for i in iters) + " |",
             "|---|" + "|".join("---:" for _ in iters) + "|"]
    for m in _ordered(methods):
        r = methods[m]
        vals = dict(zip(r["iterations"], r.get(key, [])))
        lines.append(f"| {r.get('label', m)} | " + " | ".join(
            f"{vals[i]:.{digits}f}" if i in vals else "-" for i in iters) + " |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- main


def main(argv=None) -> Dict:
    args = parse_args(argv)
    results = load_results(args.json)
    if args.plot_only:
        if not results["methods"]:
            raise SystemExit(f"{args.json}: no curves to plot")
        plot(results, args.figure)
        print(format_table(results))
        return results

    from detectron2.utils.logger import setup_logger

    os.makedirs(args.output, exist_ok=True)
    setup_logger(args.output, name="detectron2")
    setup_logger(args.output, name="d2detr")
    command = command_line("compare_convergence.py", argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    for method in args.methods:
        stored = results["methods"].get(method)
        if stored and not args.fresh and all(stored.get(k) == getattr(args, k) for k in _SETTING_KEYS):
            logger.info("%s: already in %s with the same settings; skipped (--fresh retrains)", method, args.json)
            continue
        logger.info("===== %s (%s) =====", method, METHODS[method][0])
        results["methods"][method] = dict(train_one(method, args), command=command)
        results = save_results(results, args.json, method)
        plot(results, args.figure)
        logger.info("%s: AP %s at iterations %s (%.0f s)", method, results["methods"][method]["AP"],
                    results["methods"][method]["iterations"], results["methods"][method]["wall_seconds"])
    total_s = time.perf_counter() - start
    results = load_results(args.json) if os.path.isfile(args.json) else results
    plot(results, args.figure)
    print("\nCOCO AP on neon_trees_val against training iterations:")
    print(format_table(results))
    print(f"\ncurves: {args.json}\nfigure: {args.figure}\nwall time: {total_s / 60:.1f} min")
    return results


if __name__ == "__main__":
    main()
