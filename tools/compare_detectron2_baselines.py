#!/usr/bin/env python
"""Detectron2's own Faster R-CNN and RetinaNet against d2detr models on ``neon_trees`` for the
same training-time budget: a table (markdown + JSON) and one AP-vs-time figure.

    # the committed comparison (docs/detectron2_baselines.md): the defaults, 15 min wall clock per
    # model, 2 threads, one after the other (on an otherwise idle machine):
    python tools/compare_detectron2_baselines.py \\
        --json docs/detectron2_baselines.json --figure docs/detectron2_baselines.png \\
        --markdown docs/detectron2_baselines_table.md
    # a variant beside its method in the same JSON (key "retinanet@lr0.00125"):
    python tools/compare_detectron2_baselines.py --methods retinanet --tag lr0.00125 ... optimizer.lr=0.00125
    # quick look, two models, 2 minutes each:
    python tools/compare_detectron2_baselines.py --methods faster_rcnn,dino_recipe --budget-min 2 --output /tmp/cmp
    # redraw the figure and the table from the JSON only:
    python tools/compare_detectron2_baselines.py --plot-only --json docs/detectron2_baselines.json \\
        --figure docs/detectron2_baselines.png --markdown docs/detectron2_baselines_table.md

Every model trains its LazyConfig (``METHODS``) through ``d2detr.engine.do_train`` with
``train.time_budget`` set (``d2detr/engine/time_budget.py``): the LR schedule of the config
(warmup, x0.1 at 80 %) runs over the budget's time, training stops when it is spent, and
``COCOEvaluator`` evaluates on ``neon_trees_val`` at ``--eval-fractions`` of the budget and at
its end (evaluations are not charged to the budget). ``--clock wall`` counts wall-clock time (fair
on an otherwise idle machine); ``--clock process`` counts this process's CPU time divided by
``--num-threads`` (fair between runs made under different load on a shared machine). Data are
loaded in the main process (``num_workers=0``) so the process clock sees all the work.

The baselines' recipe (FPN on the same ImageNet MobileNetV2, anchors for 15-100 px crowns, input
scale, lr, frozen BN) is in ``configs/neon_trees/detectron2_baseline_common.py`` and documented in
``docs/detectron2_baselines.md``. Results go to ``--json`` after each model (an interrupted run
keeps what finished; re-running skips models already there with the same settings, ``--fresh``
retrains). The JSON records the command, the date, the clock, and the load (``os.getloadavg``)
before and after each model.
"""
import argparse
import datetime
import json
import logging
import os
import sys
import time
from typing import Dict, List, Optional

# Allow running from a source checkout without installing d2detr.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

from d2detr.utils import (  # noqa: E402  (re-exported for the tests)
    base_method, command_line, display_label, is_seed_run, load_results, save_results,
)

#: name -> (config file, label, kind). kind "detectron2" = a Detectron2 model, "d2detr" = ours.
METHODS = {
    "faster_rcnn": ("configs/neon_trees/faster_rcnn_mobilenetv2_fpn.py", "Detectron2 Faster R-CNN (FPN)", "detectron2"),
    "faster_rcnn_adamw": (
        "configs/neon_trees/faster_rcnn_mobilenetv2_fpn_adamw.py", "Detectron2 Faster R-CNN (FPN), AdamW", "detectron2",
    ),
    "retinanet": ("configs/neon_trees/retinanet_mobilenetv2_fpn.py", "Detectron2 RetinaNet (FPN)", "detectron2"),
    "dino_recipe": ("configs/neon_trees/dino_recipe.py", "d2detr DINO recipe (make demo)", "d2detr"),
    "dino_hybrid_recipe": ("configs/neon_trees/dino_hybrid_recipe.py", "d2detr DINO recipe + hybrid matching (H-DETR)", "d2detr"),
    "dino_res2_recipe": ("configs/neon_trees/dino_res2_recipe.py", "d2detr DINO recipe + decoder-only res2 (stride 4)", "d2detr"),
    "dino": ("configs/neon_trees/dino_mobilenetv2.py", "d2detr DINO (convergence config)", "d2detr"),
    "deformable_demo": (
        "projects/deformable_detr/configs/deformable_detr_mobilenetv2_neon_trees.py",
        "d2detr two-stage Deformable DETR (earlier demo)",
        "d2detr",
    ),
}
DEFAULT_METHODS = "faster_rcnn,retinanet,dino_recipe"
COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
#: Settings that must match for a stored result to be reused instead of retrained.
_SETTING_KEYS = ("budget_s", "clock", "num_threads", "eval_fractions", "seed", "opts")

logger = logging.getLogger("d2detr.compare_baselines")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated subset of {', '.join(METHODS)} (default %(default)s)")
    p.add_argument("--budget-min", type=float, default=15.0, help="training time per model, minutes (default %(default)s)")
    p.add_argument("--clock", choices=("wall", "process"), default="wall",
                   help="budget clock: wall-clock, or this process's CPU time / --num-threads (default %(default)s)")
    p.add_argument("--num-threads", type=int, default=2, help="torch.set_num_threads (default %(default)s)")
    p.add_argument("--eval-fractions", default="0.2,0.4,0.6,0.8",
                   help="fractions of the budget at which to evaluate, besides its end (default %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="train.seed (default %(default)s)")
    p.add_argument("--output", default=os.path.join("output", "baselines"),
                   help="work folder: one training folder per model, and the JSON/PNG/MD unless given (default %(default)s)")
    p.add_argument("--json", default=None, help="results JSON (default <output>/baselines.json)")
    p.add_argument("--figure", default=None, help="AP-vs-time PNG (default <output>/baselines.png)")
    p.add_argument("--markdown", default=None, help="markdown table (default <output>/baselines.md)")
    p.add_argument("--tag", default="",
                   help="stores each model as '<method>@<tag>' with the tag in its label, so that variants "
                        "(e.g. an lr sweep given as overrides) sit beside the default in one JSON")
    p.add_argument("--fresh", action="store_true", help="retrain models already in the JSON")
    p.add_argument("--plot-only", action="store_true", help="only redraw the figure and table from the JSON")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides key=value applied to every model")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        p.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    if not args.budget_min > 0:
        p.error("--budget-min must be > 0")
    if args.num_threads < 1:
        p.error("--num-threads must be >= 1")
    try:
        args.eval_fractions = sorted(float(f) for f in args.eval_fractions.split(",") if f.strip())
    except ValueError:
        p.error(f"--eval-fractions: not a comma-separated list of numbers: {args.eval_fractions!r}")
    if any(not 0 < f < 1 for f in args.eval_fractions):
        p.error("--eval-fractions must lie strictly between 0 and 1 (the end of the budget is always evaluated)")
    args.budget_s = round(args.budget_min * 60.0, 3)
    args.opts = [o for o in args.opts if o != "--"]
    if any(c in args.tag for c in "@/ "):
        p.error(f"--tag: no '@', '/' or spaces (it becomes part of a results key and a folder): {args.tag!r}")
    args.json = args.json or os.path.join(args.output, "baselines.json")
    args.figure = args.figure or os.path.join(args.output, "baselines.png")
    args.markdown = args.markdown or os.path.join(args.output, "baselines.md")
    return args


# ---------------------------------------------------------------------------------- training


def budget_overrides(args, out_dir: str) -> List[str]:
    """The config overrides that turn a config's schedule into ``args``' time budget."""
    return [
        f"train.time_budget.seconds={args.budget_s}",
        f"train.time_budget.clock={args.clock}",
        f"train.time_budget.threads={args.num_threads}",
        f"train.time_budget.eval_fractions=[{','.join(str(f) for f in args.eval_fractions)}]",
        "train.max_iter=1000000",  # an upper bound only: the budget ends the training
        f"train.seed={args.seed}",
        f"train.output_dir={out_dir}",
        "train.device=cpu",
        "train.checkpointer.period=1000000",  # model_final only
        "dataloader.train.num_workers=0",  # the process clock must see the data loading
    ]


def _load():
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def result_key(method: str, tag: str) -> str:
    """The model's key in the results JSON (and its training folder's name)."""
    return f"{method}@{tag}" if tag else method


def train_one(method: str, args) -> Dict:
    """Trains one model for the budget; returns its AP-vs-time curve, final metrics and costs."""
    import torch
    from detectron2.config import LazyConfig
    from detectron2.engine import default_argument_parser
    from detectron2.utils.env import seed_all_rng

    from d2detr.engine import do_train
    from d2detr.engine.time_budget import TimeBudget

    config_file = os.path.join(_REPO, METHODS[method][0])
    out_dir = os.path.join(args.output, result_key(method, args.tag))
    opts = budget_overrides(args, out_dir) + list(args.opts)
    cfg = LazyConfig.apply_overrides(LazyConfig.load(config_file), opts)
    os.makedirs(out_dir, exist_ok=True)
    LazyConfig.save(cfg, os.path.join(out_dir, "config.yaml"))
    seed_all_rng(args.seed)
    torch.set_num_threads(args.num_threads)
    train_args = default_argument_parser().parse_args(["--config-file", config_file])

    load_before = _load()
    started = datetime.datetime.now(datetime.timezone.utc)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    trainer = do_train(train_args, cfg)
    wall_s, cpu_s = time.perf_counter() - wall0, time.process_time() - cpu0
    budget = next(h for h in trainer._hooks if isinstance(h, TimeBudget))

    points = [dict(h) for h in budget.history]
    final = {k.split("/", 1)[1]: float(v) for k, (v, _) in trainer.storage.latest().items() if k.startswith("bbox/")}
    if not final:
        raise RuntimeError(f"{method}: no COCO evaluation after training")
    points.append({"iteration": trainer.iter, "train_s": budget.spent_s, "fraction": 1.0,
                   "fraction_target": 1.0, "results": {f"bbox/{k}": v for k, v in final.items()}})
    curve = {"train_min": [round(p["train_s"] / 60.0, 3) for p in points], "iterations": [p["iteration"] for p in points]}
    for key in COCO_KEYS:
        curve[key] = [p["results"].get(f"bbox/{key}") for p in points]
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    return {
        "label": METHODS[method][1] + (f" [{args.tag}]" if args.tag else ""),
        "kind": METHODS[method][2],
        "config": METHODS[method][0],
        "final": {k: final[k] for k in COCO_KEYS if k in final},
        "curve": curve,
        "iterations": trainer.iter,
        "train_s": round(budget.spent_s, 1),
        "train_s_per_iter": round(budget.spent_s / max(trainer.iter, 1), 3),
        "wall_s_total": round(wall_s, 1),
        "process_cpu_s_total": round(cpu_s, 1),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "started_utc": started.strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_before": load_before,
        "loadavg_after": _load(),
        "budget_s": args.budget_s,
        "clock": args.clock,
        "num_threads": args.num_threads,
        "eval_fractions": args.eval_fractions,
        "seed": args.seed,
        "opts": list(args.opts),
    }


# ----------------------------------------------------------------------------------- results


def _ordered(methods: Dict) -> List[str]:
    """METHODS' order, each model's tagged variants after it, then anything unknown."""
    known = [k for m in METHODS for k in sorted(methods, key=lambda k: (k != m, k)) if base_method(k) == m]
    return known + [k for k in methods if k not in known]


def format_table(results: Dict) -> str:
    """Markdown: one row per model with its final COCO metrics and costs."""
    lines = [
        "| model | AP | AP50 | AP75 | APs | APm | iterations | train s / iter | parameters | budget (clock, threads) | started, load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    reevaluated = False
    for m in _ordered(results["methods"]):
        r = results["methods"][m]
        f = r["final"]
        load = r.get("loadavg_before")
        load_s = f"{load[0]:.1f}" if load else "?"
        reevaluated |= "reevaluated" in r
        lines.append(
            f"| {display_label(r)} | " + " | ".join(f"{f.get(k, float('nan')):.1f}" for k in ("AP", "AP50", "AP75", "APs", "APm"))
            + f" | {r['iterations']} | {r['train_s_per_iter']:.2f} | {r['parameters'] / 1e6:.1f} M"
            + f" | {r['budget_s'] / 60:.0f} min ({r['clock']}, {r['num_threads']}) | {r['started_utc']}, {load_s} |"
        )
    if reevaluated:
        lines.append("\n(re-evaluated): the run's checkpoint evaluated later with the config's current inference "
                     "settings; the JSON entry's `reevaluated` gives the date, the command and what the run measured.")
    return "\n".join(lines)


def plot(results: Dict, path: str) -> str:
    """AP (left) and AP50 (right) on neon_trees_val against training minutes: each model's runs of
    its config as it stands (no tag or a ``seedN`` tag) in one colour, labelled once with their
    count; tagged variants (other settings, earlier versions of a config) are left to the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"faster_rcnn": ("tab:blue", "s", "--"), "retinanet": ("tab:green", "^", "--"),
              "dino_recipe": ("tab:orange", "o", "-"), "dino_recipe_bf16": ("tab:red", "o", "-"),
              "dino_hybrid_recipe": ("tab:red", "P", "-"), "dino_res2_recipe": ("tab:purple", "X", "-"),
              "dino": ("tab:brown", "D", "-"), "deformable_demo": ("tab:gray", "v", "-")}
    methods = results["methods"]
    shown = [m for m in _ordered(methods) if is_seed_run(m)]
    runs_of: Dict[str, List[str]] = {}
    for m in shown:
        runs_of.setdefault(base_method(m), []).append(m)
    # The legend goes under the plots, two entries per row.
    legend_in = 0.25 * ((len(runs_of) + 1) // 2) + 0.45
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6 + legend_in))
    for key, ax in zip(("AP", "AP50"), axes):
        for base, keys in runs_of.items():
            color, marker, ls = styles.get(base, (None, "o", "-"))
            for i, m in enumerate(keys):
                r = methods[m]
                label = (r["label"] + (f" ({len(keys)} seeds)" if len(keys) > 1 else "")) if i == 0 else "_nolegend_"
                ys = [v if v is not None else float("nan") for v in r["curve"][key]]
                line = ax.plot(r["curve"]["train_min"], ys, marker=marker, ls=ls, color=color, label=label,
                               lw=1.5, ms=4, alpha=0.85)
                color = line[0].get_color()  # one colour for all seeds of a model
        ax.set_xlabel("training time (min; clock: " + ", ".join(sorted({r["clock"] for r in methods.values()})) + ")")
        ax.set_ylabel(f"{key} on neon_trees_val")
        ax.set_ylim(bottom=0)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=9, frameon=False)
    hidden = len(methods) - len(shown)
    if hidden:
        fig.text(0.5, 0.005, f"{hidden} tagged variants (other settings, earlier versions of a config): "
                 "see the table", ha="center", fontsize=8, color="0.4")
    any_r = next(iter(methods.values()), {})
    fig.suptitle(
        f"NEON tree crowns: Detectron2 baselines vs d2detr at equal training time "
        f"({any_r.get('budget_s', 0) / 60:.0f} min, {any_r.get('num_threads', '?')} threads, same MobileNetV2, CPU)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, legend_in / (4.6 + legend_in), 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_outputs(results: Dict, args) -> str:
    plot(results, args.figure)
    table = format_table(results)
    os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
    with open(args.markdown, "w") as f:
        f.write(f"COCO bbox metrics on neon_trees_val at the end of the budget "
                f"(`{results.get('command', '?')}`):\n\n{table}\n")
    return table


# -------------------------------------------------------------------------------------- main


def main(argv=None) -> Dict:
    args = parse_args(argv)
    results = load_results(args.json)
    if args.plot_only:
        if not results["methods"]:
            raise SystemExit(f"{args.json}: no results to plot")
        print(write_outputs(results, args))
        return results

    from detectron2.utils.logger import setup_logger

    os.makedirs(args.output, exist_ok=True)
    setup_logger(args.output, name="detectron2")
    setup_logger(args.output, name="d2detr")
    command = command_line("compare_detectron2_baselines.py", argv if argv is not None else sys.argv[1:])
    for method in args.methods:
        key = result_key(method, args.tag)
        stored = results["methods"].get(key)
        if stored and not args.fresh and all(stored.get(k) == getattr(args, k) for k in _SETTING_KEYS):
            logger.info("%s: already in %s with the same settings; skipped (--fresh retrains)", method, args.json)
            continue
        logger.info("===== %s (%s) =====", method, METHODS[method][0])
        results["methods"][key] = dict(train_one(method, args), command=command)
        results["command"] = command
        results["date_utc"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        results = save_results(results, args.json, key)
        write_outputs(results, args)
        r = results["methods"][key]
        logger.info("%s: AP %.2f after %d iterations (%.0f s %s-clock training, %.0f s wall in all)",
                    key, r["final"]["AP"], r["iterations"], r["train_s"], r["clock"], r["wall_s_total"])
    results = load_results(args.json)
    table = write_outputs(results, args)
    print("\nCOCO bbox metrics on neon_trees_val at the end of the budget:")
    print(table)
    print(f"\nresults: {args.json}\nfigure:  {args.figure}\ntable:   {args.markdown}")
    return results


if __name__ == "__main__":
    main()
