#!/usr/bin/env python
"""Parameters, FLOPs (fvcore, multiply-adds) and activations of any d2detr config at a given
input size, as a Markdown table per top-level module.

    python tools/analyze_model.py --config-file CFG [--input-size 800 1333] [--json OUT.json] \
        [--sample-image IMG] [--modules transformer.encoder,...] [--compare-config BASELINE] [key=value ...]

    # Focus-DETR's encoder and whole model against DINO's (the efficiency claim):
    python tools/analyze_model.py --config-file projects/focus_detr/configs/models/focus_detr_r50.py \
        --compare-config projects/dino/configs/models/dino_r50_4scale.py --modules transformer.encoder

The model runs one image through its whole inference graph (normalisation, backbone,
transformer, heads, post-processing). Deformable attention (d2detr::ms_deform_attn) is counted
as N*Q*M*D*L*P*5 (bilinear 4 + weight 1 per point and channel); attention through
scaled_dot_product_attention as 2*B*H*Lq*Lk*D. No checkpoint is needed (weights do not change
the counts).

``--modules``: also report these submodules (dotted names; a module called twice counts both
calls). ``--compare-config``: analyse that config's model on the same image too and print both side
by side with the ratio (the ``--modules`` a model lacks are left out of its numbers: name only
modules both have, or look at the two single tables). The overrides apply to both configs.
"""
import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from d2detr.export.analysis import analyze_model, format_comparison, format_table  # noqa: E402
from d2detr.export.cli import load_config, read_image  # noqa: E402


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input-size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"),
                        help="image height and width (default 800 1333, COCO's test size)")
    parser.add_argument("--sample-image", help="use this image (its own size) instead of --input-size")
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--modules", default="", help="comma-separated submodules to report, e.g. transformer.encoder")
    parser.add_argument("--compare-config", metavar="FILE", help="a baseline config to analyse beside this one")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="key=value config overrides")
    return parser


def main(args):
    from detectron2.config import instantiate

    logging.basicConfig(level=logging.WARNING)
    names = [n.strip() for n in args.modules.split(",") if n.strip()]

    def analyze(config_file):
        model = instantiate(load_config(config_file, args.opts).model).eval()
        if args.sample_image:
            image = read_image(args.sample_image, getattr(model, "input_format", "RGB"))
        else:
            h, w = args.input_size
            image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        own = [n for n in names if n in dict(model.named_modules())]
        return analyze_model(model, image, own)

    stats = analyze(args.config_file)
    print(format_table(stats))
    unknown = [n for n in names if n not in stats["submodules"]]
    result = stats
    if args.compare_config:
        baseline = analyze(args.compare_config)
        print()
        print(format_table(baseline))
        print()
        unknown = [n for n in unknown if n not in baseline["submodules"]]
        shared = [n for n in names if n in stats["submodules"] and n in baseline["submodules"]]
        print(format_comparison(stats, baseline, shared))
        result = {"model": stats, "baseline": baseline}
    if unknown:
        raise SystemExit(f"--modules: no submodule {unknown} in the model(s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(get_parser().parse_args())
