#!/usr/bin/env python
"""Export a d2detr model to TorchScript, torch.export or ONNX.

    python tools/export_model.py --config-file CFG --format torchscript --output DIR \
        [--sample-image IMG] [--script] train.init_checkpoint=model_final.pth [key=value ...]
    python tools/export_model.py --config-file CFG --format torch_export --output DIR ...
    python tools/export_model.py --config-file CFG --format onnx --output DIR [--deform-attn tensorrt] ...

Writes DIR/model.ts (TorchScript: traced, or scripted with --script) or DIR/model.pt2
(torch.export, dynamic height and width). The exported model takes one image tensor
[3, H, W] (uint8 or float 0-255, in the model's input_format, any size) and returns
(boxes [K, 4] XYXY in that image's pixels, scores [K], classes [K]). It needs only torch and
the d2detr._C op library (torch.ops.load_library) to run; see the README. DIR/model.onnx
(dynamic height and width) needs only onnxruntime: the deformable attention op becomes standard
ONNX operators (GridSample), or with --deform-attn tensorrt one node for TensorRT's
MultiscaleDeformableAttnPlugin_TRT (see docs/tools.md). After exporting,
the graph is checked against the eager model on the sample image and on an
image of another size.
"""
import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from d2detr.export import ExportableDetector, export_torch_export, export_torchscript  # noqa: E402
from d2detr.export.cli import build_model, dataset_class_names, load_config, read_image  # noqa: E402
from d2detr.export.onnx import DEFORM_ATTN_LOWERINGS, OPSET, export_onnx, load_onnx  # noqa: E402
from d2detr.layers.ms_deform_attn import get_library_path  # noqa: E402

logger = logging.getLogger("d2detr.export")


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig (.py) file")
    parser.add_argument("--format", choices=["torchscript", "torch_export", "onnx"], default="torchscript")
    parser.add_argument("--script", action="store_true", help="TorchScript by scripting instead of tracing")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--sample-image", help="image to trace/export with (default: a synthetic 480x640 one)")
    parser.add_argument("--dataset", help="dataset whose class names are stored in the file (default: the config's test set)")
    parser.add_argument("--min-size", type=int, default=None,
                        help="torch_export, onnx: smallest H/W accepted (default: the model's smallest, "
                             "1 + its largest feature stride, e.g. 65 for Deformable DETR R50)")
    parser.add_argument("--max-size", type=int, default=4096, help="torch_export, onnx: largest H/W accepted")
    parser.add_argument("--deform-attn", choices=sorted(DEFORM_ATTN_LOWERINGS), default="grid_sample",
                        help="onnx: deformable attention as standard operators (default) or one TensorRT plugin node")
    parser.add_argument("--opset", type=int, default=OPSET, help="onnx: ONNX opset (>= 16)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="key=value config overrides")
    return parser


def sample_image(path, input_format):
    if path:
        return read_image(path, input_format)
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, 480, 640), dtype=torch.uint8, generator=g)


def _max_diff(a, b):
    return max((x.float() - y.float()).abs().max().item() if x.numel() else 0.0 for x, y in zip(a, b))


def main(args):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config_file, args.opts)
    model = build_model(cfg, "cpu")
    classes = dataset_class_names(cfg, args.dataset, getattr(model, "num_classes", None))
    image = sample_image(args.sample_image, getattr(model, "input_format", "RGB"))
    os.makedirs(args.output, exist_ok=True)
    if args.format == "torchscript":
        path = os.path.join(args.output, "model.ts")
        exported = export_torchscript(
            model, image, path, method="script" if args.script else "trace", class_names=classes
        )
    elif args.format == "onnx":
        path = os.path.join(args.output, "model.onnx")
        export_onnx(model, image, path, deform_attn=args.deform_attn, opset=args.opset,
                    min_size=args.min_size, max_size=args.max_size, class_names=classes)
        exported = load_onnx(path) if args.deform_attn == "grid_sample" else None
    else:
        path = os.path.join(args.output, "model.pt2")
        exported = export_torch_export(model, image, path, args.min_size, args.max_size, class_names=classes).module()
    logger.info(f"wrote {path}")
    if exported is None:  # onnxruntime has no kernel for TensorRT's plugin node
        logger.info("TensorRT plugin node: build an engine with TensorRT, e.g. `trtexec --onnx=%s`", path)
        return path, {}

    # Check the graph: same outputs as the eager wrapper, on the sample and on another size.
    eager = ExportableDetector(model)
    other = torch.nn.functional.interpolate(image[None].float(), scale_factor=(0.75, 1.25), mode="bilinear")[0]
    other = other.round().clamp(0, 255).to(torch.uint8)
    diffs = {}
    with torch.no_grad():
        for name, img in (("sample", image), ("other_size", other)):
            diffs[f"{name} {tuple(img.shape[1:])}"] = _max_diff(exported(img), eager(img))
    logger.info(f"max |exported - eager| per image: {json.dumps(diffs)}")
    if args.format == "onnx":
        logger.info("run it with: onnxruntime.InferenceSession(%r).run(None, {'image': image_chw_uint8})", path)
    else:
        logger.info(
            "load it with: torch.ops.load_library(%r); model = %s", get_library_path(),
            "torch.jit.load(%r)" % path if path.endswith(".ts") else "torch.export.load(%r).module()" % path,
        )
    return path, diffs


if __name__ == "__main__":
    main(get_parser().parse_args())
