#!/usr/bin/env python
"""`make demo`: train a small DINO on real aerial tree crowns on the CPU for a time budget.

    python tools/neon_trees_demo.py                      # 15 min of 2-thread CPU time, + evaluations
    python tools/neon_trees_demo.py --fresh              # discard output/neon_trees_demo first
    python tools/neon_trees_demo.py --budget-min 0.2 --output-dir /tmp/demo_smoke   # smoke run
    python tools/neon_trees_demo.py --budget-min 0 --max-iter 600   # a fixed number of iterations instead

Steps, all with the project's own machinery:

1. trains ``configs/neon_trees/dino_recipe.py`` (DINO, MobileNetV2 with the offline ImageNet
   weights, ``neon_trees_train``) through ``d2detr.engine.do_train`` -- the loop behind
   ``tools/train_net.py`` -- for the config's ``train.time_budget`` (15 minutes of this
   process's CPU time per thread; ``d2detr/engine/time_budget.py``: the LR schedule ends when
   the budget does), evaluating on ``neon_trees_val`` with Detectron2's ``COCOEvaluator`` at
   quarters of the budget and at its end;
2. prints the final COCO AP table, and beside it Detectron2's Faster R-CNN / RetinaNet figures
   from the last ``tools/compare_detectron2_baselines.py`` run (``docs/detectron2_baselines.json``,
   with its date and command);
3. draws ground truth (left) and predictions (right) of every validation tile with
   Detectron2's ``Visualizer`` to ``<output>/predictions/<tile>.png``;
4. plots the training curves (losses, learning rate and AP against the iteration) from
   ``<output>/metrics.json`` to ``<output>/training_curves.png``.

Re-running is idempotent: by default the run resumes from ``<output>/last_checkpoint``
(Detectron2's ``--resume``), so an interrupted demo continues where it stopped and a
finished one only re-evaluates and redraws (seconds). ``--fresh`` deletes the output
folder and trains from scratch. Anything after the options is a config override
(``key=value``), as for ``tools/train_net.py``.
"""
import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections import OrderedDict
from typing import Dict, List, Optional

# Allow running from a source checkout without installing d2detr.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

DEFAULT_CONFIG = os.path.join(_REPO, "configs", "neon_trees", "dino_recipe.py")
BASELINES_JSON = os.path.join(_REPO, "docs", "detectron2_baselines.json")
DEFAULT_OUTPUT = os.path.join("output", "neon_trees_demo")
COCO_BBOX_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")

logger = logging.getLogger("d2detr.demo")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config-file", default=DEFAULT_CONFIG, help="LazyConfig to train")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT, help="train.output_dir (default %(default)s)")
    p.add_argument("--max-iter", type=int, default=None, help="override train.max_iter (an upper bound under a budget)")
    p.add_argument("--budget-min", type=float, default=None,
                   help="override train.time_budget.seconds, in minutes; 0 trains train.max_iter iterations")
    p.add_argument("--num-threads", type=int, default=2, help="torch.set_num_threads (default %(default)s)")
    p.add_argument("--fresh", action="store_true", help="delete the output folder and train from scratch")
    p.add_argument("--score-thresh", type=float, default=None,
                   help="drawn predictions' minimum score (default: the config's demo.score_threshold, else 0.3)")
    p.add_argument("--baselines-json", default=BASELINES_JSON, help="comparison results printed beside the AP table")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides key=value")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- train + eval


def train_and_evaluate(config_file: str, output_dir: str, opts: List[str], resume: bool):
    """Runs ``d2detr.engine.do_train`` on the config; returns ``(cfg, trainer, results)``
    where ``results`` is ``{"bbox": {...}}`` of the evaluation after the last iteration."""
    from detectron2.engine import default_argument_parser

    from d2detr.engine import do_train, setup

    argv = ["--config-file", config_file] + (["--resume"] if resume else [])
    args = default_argument_parser().parse_args(argv + ["train.output_dir=" + output_dir] + list(opts))
    cfg = setup(args)
    trainer = do_train(args, cfg)
    # The EvalHook put the evaluator's flattened results ("bbox/AP", ...) into the storage.
    latest = trainer.storage.latest()
    bbox = OrderedDict(
        (k.split("/", 1)[1], float(v)) for k, (v, _) in sorted(latest.items()) if k.startswith("bbox/")
    )
    return cfg, trainer, {"bbox": bbox} if bbox else {}


#: the demo's recipe in the comparison tool's JSON (``tools/compare_detectron2_baselines.py``)
DEMO_METHOD = "dino_recipe"


def format_baselines(path: str, method: str = DEMO_METHOD) -> str:
    """The last baseline comparison (``tools/compare_detectron2_baselines.py``'s JSON) as a short
    markdown table with its date, commands and budget: Detectron2's models and ``method`` as
    shipped (their seed runs), with the mean AP of each model over its seeds; the variants' count
    and where to read them. A line saying so if there is no JSON."""
    from d2detr.utils import base_method, display_label, is_seed_run

    if not os.path.isfile(path):
        return f"(no baseline comparison at {path})"
    with open(path) as f:
        results = json.load(f)
    methods = results.get("methods", {})
    # Detectron2's configs as they stand (their seed runs); variants (e.g. another lr) are counted below
    detectron2 = [k for k in methods if methods[k].get("kind") == "detectron2" and is_seed_run(k)]
    bases = list(OrderedDict.fromkeys(base_method(k) for k in detectron2))
    shown = sorted(detectron2, key=lambda k: bases.index(base_method(k)))  # each model's runs together
    shown += [k for k in methods if methods[k].get("kind") != "detectron2" and is_seed_run(k, method)]
    lines = ["| model | seed | AP | AP50 | AP75 | iterations | budget |", "|---|---:|---:|---:|---:|---:|---|"]
    seeds_ap: Dict[str, List[float]] = OrderedDict()
    for name in shown:
        r = methods[name]
        f_ = r.get("final", {})
        lines.append(
            f"| {display_label(dict(r, label=r.get('label', name)))} | {r.get('seed', '?')} | {f_.get('AP', float('nan')):.1f} "
            f"| {f_.get('AP50', float('nan')):.1f} | {f_.get('AP75', float('nan')):.1f} | {r.get('iterations', '?')} "
            f"| {r.get('budget_s', 0) / 60:.0f} min, {r.get('clock', '?')} clock, {r.get('num_threads', '?')} thread(s) |"
        )
        base = base_method(name)
        if is_seed_run(name) and "AP" in f_:
            seeds_ap.setdefault(base, []).append(f_["AP"])
    means = [f"{methods[b].get('label', b) if b in methods else b}: {sum(v) / len(v):.1f} ({len(v)} seeds)"
             for b, v in seeds_ap.items() if len(v) > 1]
    head = f"Baseline comparison (`{os.path.relpath(path)}`, updated {results.get('date_utc', '?')}):"
    tail = [f"mean AP over seeds: {'; '.join(means)}"] if means else []
    others = len(methods) - len(shown)
    if others:
        tail.append(f"({others} more rows -- variants and other models -- in the JSON and docs/detectron2_baselines.md)")
    # How each shown row was trained: its run's command, once per run, without what every run shares
    first_start: Dict[str, str] = {}
    for name in shown:
        r = methods[name]
        cmd = r.get("command") or results.get("command", "?")
        first_start[cmd] = min(first_start.get(cmd, "~"), r.get("started_utc", "?"))
    split = {cmd: _split_command(cmd) for cmd in first_start}
    outs = {out for options, out in split.values() if options is not None}
    common_out = outs.pop() if len(outs) == 1 else None
    runs = [f"runs: `{COMPARE_TOOL} <options>{' ' + common_out if common_out else ''}` with <options>:"]
    for cmd, started in sorted(first_start.items(), key=lambda x: x[1]):
        options, out = split[cmd]
        if options is None:  # not the comparison tool's command: as stored
            text = cmd
        else:
            text = options if common_out is not None else f"{options} {out}".strip()
        runs.append(f"  `{text or '(none)'}` (started {started})")
    return "\n".join([head, *lines, *tail, *runs])


COMPARE_TOOL = "python tools/compare_detectron2_baselines.py"
_OUTPUT_FLAGS = ("--json", "--figure", "--markdown")


def _split_command(cmd: str):
    """``(options, output flags)`` of a comparison command (``tools/compare_detectron2_baselines.py``):
    its options without the ``--json / --figure / --markdown`` pairs, which every run of one JSON
    shares, and those pairs; ``(None, cmd)`` for any other command."""
    import shlex

    words = shlex.split(cmd)
    if words[:2] != COMPARE_TOOL.split():
        return None, cmd
    options, out, i = [], [], 2
    while i < len(words):
        if words[i] in _OUTPUT_FLAGS and i + 1 < len(words):
            out += words[i:i + 2]
            i += 2
        else:
            options.append(words[i])
            i += 1
    return shlex.join(options), shlex.join(out)


def format_ap_table(results: Dict) -> str:
    bbox = results.get("bbox", {})
    keys = [k for k in COCO_BBOX_KEYS if k in bbox]
    head = "| " + " | ".join(keys) + " |"
    sep = "|" + "|".join(":---:" for _ in keys) + "|"
    row = "| " + " | ".join(f"{bbox[k]:.1f}" for k in keys) + " |"
    return "\n".join([head, sep, row])


# --------------------------------------------------------------------------------- drawing


def draw_predictions(cfg, model, out_dir: str, score_thresh: float = 0.3) -> List[str]:
    """Ground truth (left) and predictions with score >= ``score_thresh`` (right) of every
    image of ``cfg.dataloader.test``'s dataset, drawn with Detectron2's ``Visualizer``;
    one PNG of size (2W, H) per image. Returns the written paths."""
    import numpy as np
    import torch
    from detectron2.config import instantiate
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data import detection_utils as utils
    from detectron2.utils.visualizer import Visualizer
    from PIL import Image

    dataset_name = cfg.dataloader.test.dataset.names
    if not isinstance(dataset_name, str):
        dataset_name = dataset_name[0]
    metadata = MetadataCatalog.get(dataset_name)
    mapper = instantiate(cfg.dataloader.test.mapper)
    os.makedirs(out_dir, exist_ok=True)
    was_training = model.training
    model.eval()
    paths = []
    try:
        for d in DatasetCatalog.get(dataset_name):
            rgb = utils.read_image(d["file_name"], format="RGB")
            with torch.no_grad():
                inst = model([mapper(d)])[0]["instances"].to("cpu")
            inst = inst[inst.scores >= score_thresh]
            gt = Visualizer(rgb, metadata).overlay_instances(
                boxes=np.array([a["bbox"] for a in d.get("annotations", [])]).reshape(-1, 4),
                assigned_colors=[(0.1, 0.9, 0.1)] * len(d.get("annotations", [])),
            )
            boxes = inst.pred_boxes.tensor.numpy()
            pred = Visualizer(rgb, metadata).overlay_instances(
                boxes=boxes,
                labels=[f"{s:.2f}" for s in inst.scores.tolist()] if len(boxes) <= 30 else None,
                assigned_colors=[(1.0, 0.55, 0.0)] * len(boxes),
            )
            canvas = np.concatenate([gt.get_image(), pred.get_image()], axis=1)
            name = os.path.splitext(os.path.basename(d["file_name"]))[0] + ".png"
            path = os.path.join(out_dir, name)
            Image.fromarray(canvas).save(path)
            paths.append(path)
    finally:
        model.train(was_training)
    return paths


# ---------------------------------------------------------------------------------- curves


def read_metrics(path: str) -> List[Dict]:
    """The entries of Detectron2's ``metrics.json`` (one JSON object per line), the last
    entry per (iteration, keys) kept, sorted by iteration."""
    rows: Dict = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if "iteration" in entry:
                rows[(entry["iteration"], tuple(sorted(entry)))] = entry
    return [rows[k] for k in sorted(rows, key=lambda k: k[0])]


def plot_training_curves(metrics_path: str, out_path: str) -> str:
    """Losses (left), learning rate (middle) and bbox AP / AP50 (right) against iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = read_metrics(metrics_path)

    def series(key):
        pts = [(e["iteration"], e[key]) for e in entries if key in e]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for key in ("total_loss", "loss_class", "loss_bbox", "loss_giou"):
        x, y = series(key)
        if x:
            axes[0].plot(x, y, label=key, lw=2 if key == "total_loss" else 1)
    axes[0].set_title("training loss (weighted; total includes aux)")
    axes[0].set_xlabel("iteration")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    x, y = series("lr")
    if x:
        axes[1].plot(x, y)
    axes[1].set_title("learning rate")
    axes[1].set_xlabel("iteration")
    axes[1].grid(alpha=0.3)
    for key in ("bbox/AP", "bbox/AP50", "bbox/AP75"):
        x, y = series(key)
        if x:
            axes[2].plot(x, y, marker="o", label=key)
    axes[2].set_title("neon_trees_val (COCO)")
    axes[2].set_xlabel("iteration")
    axes[2].set_ylim(bottom=0)
    axes[2].legend()
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=80)
    plt.close(fig)
    return out_path


# -------------------------------------------------------------------------------------- main


def main(argv=None) -> Dict:
    args = parse_args(argv)
    import torch

    from d2detr.checkpoint import use_ema_weights

    torch.set_num_threads(args.num_threads)
    opts = [o for o in args.opts if o != "--"]
    if args.max_iter is not None:
        opts.append(f"train.max_iter={args.max_iter}")
    if args.budget_min is not None:
        if args.budget_min < 0:
            raise SystemExit("--budget-min must be >= 0")
        opts.append(f"train.time_budget.seconds={args.budget_min * 60.0}")
    if args.fresh and os.path.isdir(args.output_dir):
        shutil.rmtree(args.output_dir)
    resume = os.path.isfile(os.path.join(args.output_dir, "last_checkpoint"))

    start = time.perf_counter()
    cfg, trainer, results = train_and_evaluate(args.config_file, args.output_dir, opts, resume)
    train_eval_s = time.perf_counter() - start
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    score_thresh = args.score_thresh
    if score_thresh is None:
        score_thresh = float(cfg.get("demo", {}).get("score_threshold", 0.3))
    pred_dir = os.path.join(args.output_dir, "predictions")
    model_ema = getattr(trainer, "model_ema", None)
    if model_ema is not None and use_ema_weights(cfg):  # draw what was evaluated: the EMA weights
        with model_ema.apply_to(model):
            pngs = draw_predictions(cfg, model, pred_dir, score_thresh)
    else:
        pngs = draw_predictions(cfg, model, pred_dir, score_thresh)
    curves = plot_training_curves(
        os.path.join(args.output_dir, "metrics.json"), os.path.join(args.output_dir, "training_curves.png")
    )
    total_s = time.perf_counter() - start

    print()
    budget = (cfg.train.get("time_budget", None) or {}).get("seconds", 0)
    spent = f", a {budget / 60:.1f} min budget ({cfg.train.time_budget.clock} clock)" if budget else ""
    print(f"neon_trees_val, COCO bbox metrics of {os.path.relpath(args.config_file, _REPO)} after {trainer.iter} "
          f"iterations{spent} ({'resumed' if resume else 'trained from scratch'}; {args.num_threads} threads):")
    print(format_ap_table(results) if results else "(no evaluation results)")
    print()
    print(format_baselines(args.baselines_json))
    print(f"predictions drawn (score >= {score_thresh}): {len(pngs)} PNGs in {os.path.dirname(pngs[0]) if pngs else '-'}")
    print(f"training curves:   {curves}")
    print(f"wall time: train + eval {train_eval_s / 60:.1f} min, total {total_s / 60:.1f} min")
    return {"results": results, "pngs": pngs, "curves": curves, "wall_s": total_s, "cfg": cfg}


if __name__ == "__main__":
    main()
