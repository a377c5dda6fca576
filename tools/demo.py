#!/usr/bin/env python
"""Run a d2detr model on images, folders or a video and draw its detections with Detectron2's
Visualizer and the dataset's class names.

    python tools/demo.py --config-file CFG --input img1.jpg img2.png folder/ --output out/ \
        [--confidence-threshold T] [--device cpu|cuda] [--dataset NAME] train.init_checkpoint=model.pth
    python tools/demo.py --config-file CFG --video-input clip.mp4 --output out.mp4 ...

Images are written as PNG to the --output folder (same base name); a video is written frame by
frame (mp4v) to --output (a file, or a folder that gets <name>.mp4). Each image is resized as the
evaluation resizes it: by the config's test-time augmentation (``dataloader.test.mapper.augmentation``,
e.g. the shortest edge to 416 for the NEON-trees config), or, for a model-only config, shortest
edge 800 / longest 1333; ``--min-size``/``--max-size`` replace it (``--min-size 0`` keeps the
image as it is). Boxes are drawn on the original image, in its pixels.

Detections with a score >= the threshold are drawn: ``--confidence-threshold``, else the config's
``demo.score_threshold`` (a config sets it for a model whose scores stay low, e.g.
``demo = dict(score_threshold=0.3)``), else Detectron2's 0.5. The number drawn per image is
printed. The checkpoint's EMA weights are used when it has them
(``train.model_ema.use_for_eval=False``: its raw weights). Class names come from --dataset, else
from the config's test dataset (d2detr's datasets are registered first).
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.utils.visualizer import ColorMode, Visualizer  # noqa: E402

from omegaconf import OmegaConf  # noqa: E402

from d2detr.export.cli import (  # noqa: E402
    DEFAULT_MAX_SIZE,
    DEFAULT_MIN_SIZE,
    build_model,
    dataset_class_names,
    list_images,
    load_config,
    test_time_augmentations,
)

logger = logging.getLogger("d2detr.demo")

#: Detectron2's demo threshold, used when neither the command line nor the config sets one.
DEFAULT_SCORE_THRESHOLD = 0.5


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", nargs="+", help="image files and/or folders of images")
    parser.add_argument("--video-input", help="a video file")
    parser.add_argument("--output", required=True, help="folder for images; file or folder for a video")
    parser.add_argument("--confidence-threshold", type=float, default=None,
                        help="draw detections with at least this score (default: the config's "
                             f"demo.score_threshold, else {DEFAULT_SCORE_THRESHOLD})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--dataset", help="dataset whose class names to use (default: the config's test set)")
    parser.add_argument("--min-size", type=int, default=None,
                        help="test-time shortest edge, replacing the config's test resize (0: no resize)")
    parser.add_argument("--max-size", type=int, default=None,
                        help=f"test-time longest edge, with --min-size (default {DEFAULT_MAX_SIZE})")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="key=value config overrides")
    return parser


def score_threshold(cfg, threshold=None):
    """``(threshold, where it comes from)``: ``threshold`` when given, else the config's
    ``demo.score_threshold``, else Detectron2's 0.5."""
    source = "--confidence-threshold"
    if threshold is None:
        threshold, source = OmegaConf.select(cfg, "demo.score_threshold", default=None), "the config's demo.score_threshold"
    if threshold is None:
        threshold, source = DEFAULT_SCORE_THRESHOLD, "Detectron2's default"
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold != threshold:
        raise ValueError(f"score threshold ({source}) must be a number (scores lie in [0, 1]), got {threshold!r}")
    return float(threshold), source


class Predictor:
    """Detectron2's DefaultPredictor for a LazyConfig model: one BGR ``HxWx3`` uint8 array in,
    ``Instances`` on the CPU in that image's pixel coordinates out. ``augmentations``: the
    test-time ones (see :func:`test_time_augmentations`); ``None``: shortest edge ``min_size``
    (0: none), longest ``max_size``."""

    def __init__(self, model, min_size=DEFAULT_MIN_SIZE, max_size=DEFAULT_MAX_SIZE, augmentations=None):
        self.model = model
        self.input_format = getattr(model, "input_format", "RGB")
        if augmentations is None:
            augmentations = [T.ResizeShortestEdge(min_size, max_size)] if min_size > 0 else []
        self.aug = T.AugmentationList(list(augmentations))

    @torch.no_grad()
    def __call__(self, bgr: np.ndarray):
        h, w = bgr.shape[:2]
        image = bgr[:, :, ::-1] if self.input_format == "RGB" else bgr
        aug_input = T.AugInput(np.ascontiguousarray(image))
        self.aug(aug_input)
        tensor = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        return self.model([{"image": tensor, "height": h, "width": w}])[0]["instances"].to("cpu")


def metadata_for(cfg, dataset, num_classes):
    classes = dataset_class_names(cfg, dataset, num_classes)
    name = dataset or "__d2detr_demo"
    meta = MetadataCatalog.get(name)
    if not meta.get("thing_classes", None):
        meta.set(thing_classes=classes)
    return meta


def draw(bgr, instances, metadata, threshold):
    """``(drawn BGR image, number drawn, best score)`` for ``instances`` with scores >= ``threshold``."""
    best = float(instances.scores.max()) if len(instances) else None
    instances = instances[instances.scores >= threshold]
    vis = Visualizer(bgr[:, :, ::-1], metadata, instance_mode=ColorMode.IMAGE)
    return vis.draw_instance_predictions(instances).get_image()[:, :, ::-1], len(instances), best


def run_images(predictor, paths, out_dir, metadata, threshold):
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for path in paths:
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"cannot read image {path}")
        drawn, num, best = draw(bgr, predictor(bgr), metadata, threshold)
        stem = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0])
        out, n_same = stem + ".png", 1
        while out in written:  # same name in two input folders: keep both
            out, n_same = f"{stem}_{n_same}.png", n_same + 1
        cv2.imwrite(out, drawn)
        line = f"{path}: {num} detections drawn (score >= {threshold:g}) -> {out}"
        if num == 0 and best is not None:
            line += f"; best score {best:.3f}: lower --confidence-threshold to see more"
        print(line, flush=True)
        written.append(out)
    return written


def run_video(predictor, path, out, metadata, threshold):
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        raise ValueError(f"cannot open video {path}")
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    if os.path.isdir(out) or out.endswith(os.sep) or not os.path.splitext(out)[1]:
        os.makedirs(out, exist_ok=True)
        out = os.path.join(out, os.path.splitext(os.path.basename(path))[0] + ".mp4")
    writer = cv2.VideoWriter(out, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    frames = total = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        drawn, num, _ = draw(frame, predictor(frame), metadata, threshold)
        writer.write(np.ascontiguousarray(drawn))
        frames += 1
        total += num
    cap.release()
    writer.release()
    print(f"{path}: {frames} frames, {total} detections drawn (score >= {threshold:g}) -> {out}", flush=True)
    return out


def main(args):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if bool(args.input) == bool(args.video_input):
        raise SystemExit("give either --input (images/folders) or --video-input")
    cfg = load_config(args.config_file, args.opts)
    threshold, source = score_threshold(cfg, args.confidence_threshold)
    augmentations, resize = test_time_augmentations(cfg, args.min_size, args.max_size)
    model = build_model(cfg, args.device)
    metadata = metadata_for(cfg, args.dataset, getattr(model, "num_classes", None))
    logger.info(f"score threshold {threshold:g} ({source}); test-time resize: {resize}")
    predictor = Predictor(model, augmentations=augmentations)
    if args.video_input:
        return run_video(predictor, args.video_input, args.output, metadata, threshold)
    return run_images(predictor, list_images(args.input), args.output, metadata, threshold)

if __name__ == "__main__":
    main(get_parser().parse_args())
