#!/usr/bin/env python
"""Where do the two branches' discriminative points sit inside their anchors?

    python projects/sd_detr/tools/point_statistics.py --config-file configs/neon_trees/sd_detr_mobilenetv2.py \\
        [--dataset neon_trees_val] [--min-size 416] train.init_checkpoint=model_final.pth

Runs the model on every image of the dataset and prints, per branch, the mean |offset| of its
points from the anchor centre in units of the half box size (0: centre, 1: box border), the
fraction of points within 5 % of the border, and the mean distance of the branch's reference
point from the centre. Without ``train.init_checkpoint`` the model keeps its initial weights.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

import torch  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.data import detection_utils as utils  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402

import d2detr.data.datasets  # noqa: E402,F401
from d2detr.export.cli import build_model, load_config  # noqa: E402


def point_statistics(model, images):
    """``{branch: (mean |offset|, fraction at the border, mean |reference offset|)}`` over ``images``."""
    sums = {b: torch.zeros(3) for b in ("cls", "loc")}
    n = 0
    with torch.no_grad():
        for image in images:
            out = model.forward_features(*model.preprocess_image([{"image": image}]))
            if "cls_points" not in out:
                raise ValueError("the model has no task-aware queries (model.transformer.task_aware_queries=False)")
            centre, half = out["anchors"][0, :, None, :2], out["anchors"][0, :, None, 2:] / 2
            for b in sums:
                offsets = ((out[f"{b}_points"][0] - centre) / half).abs()
                reference = ((out[f"{b}_reference_points"][0] - centre[:, 0]) / half[:, 0]).abs()
                sums[b] += torch.stack([offsets.mean(), (offsets > 0.95).float().mean(), reference.mean()])
            n += 1
    return {b: (s / max(n, 1)).tolist() for b, s in sums.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", required=True)
    p.add_argument("--dataset", default="neon_trees_val")
    p.add_argument("--min-size", type=int, default=416)
    p.add_argument("opts", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = build_model(load_config(args.config_file, args.opts), "cpu").eval()
    aug = T.ResizeShortestEdge(args.min_size, 1333)
    images = []
    for d in DatasetCatalog.get(args.dataset):
        rgb = utils.read_image(d["file_name"], format="RGB")
        images.append(torch.as_tensor(aug.get_transform(rgb).apply_image(rgb).transpose(2, 0, 1).copy()))
    stats = point_statistics(model, images)
    print(f"{len(images)} images of {args.dataset}")
    print("| branch | mean abs offset (half box) | points at the border (> 0.95) | reference point from centre |")
    print("|---|---:|---:|---:|")
    for b, (mean, border, ref) in stats.items():
        print(f"| {b} | {mean:.2f} | {100 * border:.0f} % | {ref:.2f} |")
    return stats


if __name__ == "__main__":
    main()
