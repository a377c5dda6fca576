#!/usr/bin/env python
"""The equilibrium claim of DEQDet: COCO AP against the number of refinement steps at test time,
for weight-tied detectors (RNNDet, DEQDet), one line per trained model, one figure.

    python tools/plot_refinement_steps.py \\
        --run RNNDet configs/neon_trees/rnndet_mobilenetv2.py output/convergence/rnndet/model_final.pth \\
        --run DEQDet configs/neon_trees/deqdet_mobilenetv2.py output/convergence/deqdet/model_final.pth \\
        --max-steps 40 --figure docs/refinement_steps_neon_trees.png --json docs/refinement_steps_neon_trees.json

Each ``--run LABEL CONFIG CHECKPOINT`` is evaluated on its config's test set (``dataloader.test``,
``dataloader.evaluator``; neon_trees_val for the neon configs) after 1, 2, ..., ``--max-steps``
steps of its refinement stage, in one pass per image (``outputs_per_step``): the outputs after
``n`` steps are exactly what the model gives with ``model.test_refinement_steps=n``. A dotted line
marks each model's own number of test steps. ``--plot-only`` redraws from the JSON.
"""
import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

logger = logging.getLogger("d2detr.plot_refinement_steps")
COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", nargs=3, action="append", default=[], metavar=("LABEL", "CONFIG", "CHECKPOINT"),
                   help="a trained weight-tied model (repeat for several)")
    p.add_argument("--max-steps", type=int, default=40, help="evaluate after 1 .. N refinement steps (default %(default)s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", default="refinement_steps.json", help="the AP table (read with --plot-only)")
    p.add_argument("--figure", default="refinement_steps.png")
    p.add_argument("--plot-only", action="store_true", help="redraw the figure from --json")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="key=value overrides for every config")
    return p


def evaluate_steps(cfg, model, max_steps: int):
    """``{n: COCO bbox results}`` for n = 1..max_steps refinement steps on ``cfg.dataloader.test``."""
    import tempfile

    import torch
    from detectron2.config import instantiate
    from detectron2.modeling.postprocessing import detector_postprocess
    from omegaconf import OmegaConf

    if not hasattr(model, "outputs_per_step"):
        raise TypeError(f"{type(model).__name__} has no weight-tied refinement stage (RNNDet, DEQDet)")
    cache = tempfile.mkdtemp(prefix="refinement_steps_")
    evaluator_cfg = OmegaConf.merge(cfg.dataloader.evaluator, {"output_dir": cache})
    evaluators = {n: instantiate(evaluator_cfg) for n in range(1, max_steps + 1)}
    for e in evaluators.values():
        e.reset()
    model.eval()
    with torch.no_grad():
        for inputs in instantiate(cfg.dataloader.test):
            images, masks = model.preprocess_image(inputs)
            for n, outputs in model.outputs_per_step(images, masks, max_steps):
                if n == 0:
                    continue
                processed = [
                    {"instances": detector_postprocess(r, x.get("height", s[0]), x.get("width", s[1]))}
                    for r, x, s in zip(model.inference(outputs, images.image_sizes), inputs, images.image_sizes)
                ]
                evaluators[n].process(inputs, processed)
    return {n: e.evaluate()["bbox"] for n, e in evaluators.items()}


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for key, ax in zip(("AP", "AP50"), axes):
        for i, run in enumerate(results["runs"]):
            color = f"C{i}"
            steps = [int(n) for n in run["steps"]]
            ax.plot(steps, [run["steps"][str(n)][key] for n in steps], marker="o", ms=3, color=color, label=run["label"])
            if run.get("test_refinement_steps"):
                ax.axvline(run["test_refinement_steps"], color=color, ls=":", lw=1)
        ax.set_xlabel("refinement steps at test time (dotted: the model's default)")
        ax.set_ylabel(f"{key} on {results.get('dataset', 'the test set')}")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=9)
    fig.suptitle("AP against the number of weight-tied refinement steps at test time", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def format_table(results, key="AP"):
    steps = sorted({int(n) for r in results["runs"] for n in r["steps"]})
    lines = ["| model | " + " | ".join(map(str, steps)) + " |", "|---|" + "|".join("---:" for _ in steps) + "|"]
    for r in results["runs"]:
        lines.append(f"| {r['label']} | " + " | ".join(f"{r['steps'][str(n)][key]:.2f}" for n in steps) + " |")
    return "\n".join(lines)


def main(args):
    if args.plot_only:
        with open(args.json) as f:
            results = json.load(f)
        plot(results, args.figure)
        print(format_table(results))
        return results
    if not args.run:
        raise SystemExit("give at least one --run LABEL CONFIG CHECKPOINT (or --plot-only)")
    if args.max_steps < 1:
        raise SystemExit("--max-steps must be >= 1")
    import torch
    from detectron2.utils.logger import setup_logger

    from d2detr.export.cli import build_model, load_config

    setup_logger(name="d2detr")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    command = "python tools/plot_refinement_steps.py " + " ".join(sys.argv[1:])
    results = {"metric": "COCO bbox AP (x100)", "command": command, "runs": []}
    for label, config, checkpoint in args.run:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"--run {label}: no checkpoint {checkpoint}")
        cfg = load_config(config, args.opts)
        model = build_model(cfg, args.device, weights=checkpoint)
        results["dataset"] = str(cfg.dataloader.test.dataset.names)
        logger.info("%s: evaluating 1..%d refinement steps", label, args.max_steps)
        per_step = evaluate_steps(cfg, model, args.max_steps)
        results["runs"].append({
            "label": label, "config": config, "checkpoint": checkpoint,
            "test_refinement_steps": int(model.test_refinement_steps),
            "steps": {str(n): {k: float(r[k]) for k in COCO_KEYS if k in r} for n, r in per_step.items()},
        })
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    plot(results, args.figure)
    print(format_table(results))
    return results


if __name__ == "__main__":
    main(get_parser().parse_args())
