#!/usr/bin/env python
"""Where do the decoder queries look? The pictures the papers explain themselves with.

    python tools/visualize_attention.py --config-file CFG --input img.jpg [more images/folders] \
        --output out/ [--queries 3 17 | --topk 3] [--layer -1] [--save-data] train.init_checkpoint=model.pth

For the chosen queries (default: the --topk highest-scoring ones) of decoder layer --layer
(default the last), overlaid on the (test-resized) image with each query's predicted box, class
and score:

* deformable methods: one panel per feature level with the query's sampling points of every
  head (dot area proportional to the attention weight; the star is the reference point);
* DETR-style methods: one panel per query with its cross-attention map (mean over heads);
* SD-DETR (decoupled classification / localisation cross-attention): two rows of such panels,
  the classification branch's maps above the localisation branch's (the paper's Figure 4), with
  each branch's reference point (star) and, with task-aware queries, its discriminative points.
* AdaMixer, RNNDet, DEQDet (no cross-attention: 3D feature sampling): one panel per query with
  the 3D sampling points of stage call --layer (a weight-tied stage counts once per step), the
  dot colour giving the point's scale (its expected pyramid level, blue = finest), the thin box
  the one the points were placed in.

Writes <output>/<image>_attention.png and, with --save-data, <image>_attention.npz (the
queries, their boxes, and the sampling locations in pixels and weights, or the maps).
"""
import argparse
import logging
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.utils.colormap import colormap  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402

from d2detr.export import ExportableDetector  # noqa: E402
from d2detr.export.attention_maps import AttentionRecord, AttentionRecorder, deformable_sampling  # noqa: E402
from d2detr.export.cli import (  # noqa: E402
    DEFAULT_MAX_SIZE,
    build_model,
    dataset_class_names,
    list_images,
    load_config,
    test_time_augmentations,
)
from d2detr.layers.box_ops import box_cxcywh_to_xyxy  # noqa: E402

logger = logging.getLogger("d2detr.visualize_attention")


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", nargs="+", required=True, help="image files and/or folders")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--queries", type=int, nargs="+", help="query indices (default: the top --topk)")
    parser.add_argument("--topk", type=int, default=3, help="how many top-scoring queries to draw")
    parser.add_argument("--layer", type=int, default=-1, help="decoder layer (default: the last)")
    parser.add_argument("--dataset", help="dataset whose class names label the boxes")
    parser.add_argument("--min-size", type=int, default=None,
                        help="test-time shortest edge, replacing the config's test resize (0: no resize; "
                             "default: the config's dataloader.test.mapper.augmentation, as evaluation)")
    parser.add_argument("--max-size", type=int, default=None,
                        help=f"test-time longest edge, with --min-size (default {DEFAULT_MAX_SIZE})")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--save-data", action="store_true", help="also write the numbers (.npz)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="key=value config overrides")
    return parser


@torch.no_grad()
def inspect_image(model, image: torch.Tensor, layer: int = -1):
    """Runs ``model`` on one ``[3,H,W]`` image with attention recording. Returns
    ``(scores [Q], classes [Q], boxes [Q,4] XYXY pixels, padded input (H', W'), record)``."""
    wrapper = ExportableDetector(model)
    images, masks, size = wrapper.preprocess(image)
    with AttentionRecorder(model) as recorder:
        if wrapper.needs_targets:
            outputs = model.forward_features(images, masks, targets=None)
        else:
            outputs = model.forward_features(images, masks)
    logits = outputs["pred_logits"][0].float()
    if getattr(model, "use_focal", False):
        scores, classes = logits.sigmoid().max(-1)
    else:
        scores, classes = logits.softmax(-1)[:, :-1].max(-1)
    h, w = size.tolist()
    boxes = box_cxcywh_to_xyxy(outputs["pred_boxes"][0].float()) * torch.tensor([w, h, w, h])
    record = decoupled_cross_attention(recorder, outputs, layer, size) or recorder.decoder_cross_attention(
        logits.shape[0], layer)
    if record is None:
        raise RuntimeError(f"{type(model).__name__}: found no decoder cross-attention to record")
    return scores, classes, boxes, tuple(images.tensor.shape[-2:]), record


# ------------------------------------------------- SD-DETR: classification vs localisation branch
def decoupled_cross_attention(recorder, outputs, layer: int, size):
    """For a decoder with separate classification / localisation cross-attention (SD-DETR's
    ``...layers.<i>.parts.cls.cross_attn`` and ``...parts.loc.cross_attn``): one record of kind
    ``"decoupled"`` holding both branches' records of decoder layer ``layer`` and, in image pixels,
    their reference points and discriminative points when the outputs carry them. None otherwise."""
    branches = {}
    for b in ("cls", "loc"):
        branches[b] = [r for r in recorder.records
                       if r.kind == "dense" and "decoder" in r.name and r.name.endswith(f".{b}.cross_attn")]
    if not branches["cls"] or len(branches["cls"]) != len(branches["loc"]):
        return None
    h, w = size.tolist()
    scale = torch.tensor([w, h])
    data = {b: branches[b][layer] for b in ("cls", "loc")}
    for b in ("cls", "loc"):
        for key in (f"{b}_reference_points", f"{b}_points"):
            if key in outputs:
                data[key] = outputs[key][0].float().cpu() * scale
    name = data["cls"].name.rsplit(".cls.", 1)[0]
    return AttentionRecord(name, "decoupled", data["cls"].module, data)


def draw_decoupled(rgb, queries, labels, boxes, padded_hw, record, colors):
    """Rows: the classification branch's cross-attention maps (top), the localisation branch's
    (bottom); one column per query. Returns ``(picture, data)``."""
    H, W = rgb.shape[:2]
    Hp, Wp = padded_hw
    rows, data = [], {}
    for b, title in (("cls", "classification"), ("loc", "localisation")):
        w = record.data[b].data["weights"][0]  # [heads, Q, S]
        h_f, w_f = _feature_size(w.shape[-1], padded_hw)
        maps = w[:, queries].mean(0).reshape(len(queries), h_f, w_f)
        data[f"{b}_attention_maps"] = maps.numpy()
        panels = []
        for i, q in enumerate(queries):
            m = maps[i].numpy()
            m = cv2.resize(m / max(m.max(), 1e-12), (Wp, Hp), interpolation=cv2.INTER_NEAREST)[:H, :W]
            heat = cv2.applyColorMap((m * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1]
            canvas = np.ascontiguousarray(_base(cv2.addWeighted(rgb, 0.5, heat, 0.5, 0), boxes[q].numpy(), labels[i],
                                                colors[i % len(colors)]))
            points = record.data.get(f"{b}_points")
            if points is not None:
                for x, y in points[q].tolist():
                    cv2.circle(canvas, (int(round(x)), int(round(y))), 3, (255, 255, 255), -1, cv2.LINE_AA)
            ref = record.data.get(f"{b}_reference_points")
            if ref is not None:
                rx, ry = ref[q].tolist()
                cv2.drawMarker(canvas, (int(round(rx)), int(round(ry))), (255, 255, 255), cv2.MARKER_STAR, 14, 2)
            cv2.putText(canvas, title, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
            panels.append(canvas)
        rows.append(np.concatenate(panels, axis=1))
    for key in ("cls_reference_points", "loc_reference_points", "cls_points", "loc_points"):
        if key in record.data:
            data[key] = record.data[key][queries].numpy()
    return np.concatenate(rows, axis=0), data


def _feature_size(num_tokens: int, padded_hw):
    """(h, w) of the single feature map a dense cross-attention attends over."""
    H, W = padded_hw
    for stride in (32, 16, 8, 64, 4, 2, 1, 128):
        h, w = math.ceil(H / stride), math.ceil(W / stride)
        if h * w == num_tokens:
            return h, w
    raise ValueError(f"cannot lay {num_tokens} keys out as a feature map of a {H}x{W} input")


def _base(rgb, box, label, color):
    vis = Visualizer(rgb)
    return vis.overlay_instances(boxes=[box], labels=[label], assigned_colors=[color]).get_image()


def draw(rgb, queries, scores, classes, boxes, padded_hw, record, class_names):
    """The panels as one RGB image, and the numbers behind them."""
    colors = colormap(rgb=True, maximum=1)
    H, W = rgb.shape[:2]
    Hp, Wp = padded_hw
    labels = [
        f"q{q} {class_names[int(classes[q])] if int(classes[q]) < len(class_names) else int(classes[q])} "
        f"{float(scores[q]):.2f}"
        for q in queries
    ]
    data = {"queries": np.array(queries), "boxes": boxes[queries].numpy(), "scores": scores[queries].numpy()}
    if record.kind == "decoupled":
        picture, branch_data = draw_decoupled(rgb, queries, labels, boxes, padded_hw, record, colors)
        return picture, {**data, **branch_data}
    panels = []
    if record.kind == "deformable":
        locations, weights = deformable_sampling(record.module, record)
        locations = locations[0, queries] * torch.tensor([Wp, Hp], dtype=locations.dtype)  # [n,M,L,P,2] pixels
        weights = weights[0, queries]  # [n,M,L,P]
        ref = record.data["reference_points"][0, queries]  # [n,L,2|4]
        ref_xy = ref[..., :2] * torch.tensor([Wp, Hp], dtype=ref.dtype)
        shapes = record.data["spatial_shapes"].tolist()
        for lvl in range(locations.shape[2]):
            canvas = rgb.copy()
            for i, q in enumerate(queries):
                canvas = _base(canvas, boxes[q].numpy(), labels[i], colors[i % len(colors)])
            canvas = np.ascontiguousarray(canvas)
            overlay = canvas.copy()
            for i in range(len(queries)):
                color = tuple(int(c * 255) for c in colors[i % len(colors)])
                pts, wts = locations[i, :, lvl].reshape(-1, 2), weights[i, :, lvl].reshape(-1)
                for (x, y), wt in zip(pts.tolist(), wts.tolist()):
                    radius = max(1, int(round(2 + 14 * math.sqrt(wt))))
                    cv2.circle(overlay, (int(round(x)), int(round(y))), radius, color, -1, cv2.LINE_AA)
                rx, ry = ref_xy[i, lvl].tolist()
                cv2.drawMarker(canvas, (int(round(rx)), int(round(ry))), color, cv2.MARKER_STAR, 14, 2)
            canvas = cv2.addWeighted(overlay, 0.6, canvas, 0.4, 0)
            h_l, w_l = shapes[lvl]
            cv2.putText(canvas, f"level {lvl} ({h_l}x{w_l})", (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                        (255, 255, 255), 1, cv2.LINE_AA)
            panels.append(canvas)
        data.update(sampling_locations=locations.numpy(), attention_weights=weights.numpy(),
                    reference_points=ref_xy.numpy(), spatial_shapes=np.array(shapes))
    else:
        w = record.data["weights"][0]  # [heads, Q, S]
        h_f, w_f = _feature_size(w.shape[-1], padded_hw)
        maps = w[:, queries].mean(0).reshape(len(queries), h_f, w_f)  # [n, h, w]
        for i, q in enumerate(queries):
            m = maps[i].numpy()
            m = cv2.resize(m / max(m.max(), 1e-12), (Wp, Hp), interpolation=cv2.INTER_NEAREST)[:H, :W]
            heat = cv2.applyColorMap((m * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1]
            canvas = cv2.addWeighted(rgb, 0.5, heat, 0.5, 0)
            panels.append(np.ascontiguousarray(_base(canvas, boxes[q].numpy(), labels[i], colors[i % len(colors)])))
        data.update(attention_maps=maps.numpy())
    return np.concatenate(panels, axis=1), data


# ------------------------------------------------ AdaMixer family: 3D sampling points
def has_3d_sampling(model) -> bool:
    from d2detr.modeling.adamixer import AdaptiveSamplingMixing

    return any(isinstance(m, AdaptiveSamplingMixing) for m in model.modules())


@torch.no_grad()
def inspect_sampling_3d(model, image: torch.Tensor, layer: int = -1):
    """Like :func:`inspect_image` for a model with 3D sampling: ``(scores, classes, boxes,
    record)``, the record of stage call ``layer`` (:class:`SamplingPointsRecorder`)."""
    from d2detr.modeling.adamixer import SamplingPointsRecorder

    wrapper = ExportableDetector(model)
    images, masks, size = wrapper.preprocess(image)
    with SamplingPointsRecorder(model) as recorder:
        outputs = model.forward_features(images, masks)
    scores, classes = outputs["pred_logits"][0].float().sigmoid().max(-1)
    h, w = size.tolist()
    boxes = box_cxcywh_to_xyxy(outputs["pred_boxes"][0].float()) * torch.tensor([w, h, w, h])
    return scores, classes, boxes, recorder.records[layer]


def draw_sampling_3d(rgb, queries, scores, classes, boxes, record, class_names):
    """One panel per query: its box and label, the box the points were placed in (thin white)
    and its ``G x P`` sampling points coloured by their expected level; and the numbers."""
    colors = colormap(rgb=True, maximum=1)
    weights = record["level_weights"][0, queries].float()  # [n, G, P, L]
    levels = weights.shape[-1]
    expected_level = (weights * torch.arange(levels, dtype=weights.dtype)).sum(-1) / max(levels - 1, 1)
    xy = record["xy"][0, queries].float()  # [n, G, P, 2]
    panels = []
    for i, q in enumerate(queries):
        name = class_names[int(classes[q])] if int(classes[q]) < len(class_names) else str(int(classes[q]))
        canvas = np.ascontiguousarray(_base(rgb.copy(), boxes[q].numpy(), f"q{q} {name} {float(scores[q]):.2f}",
                                            colors[i % len(colors)]))
        x0, y0, x1, y1 = [int(round(v)) for v in record["box"][0, q].tolist()]
        cv2.rectangle(canvas, (x0, y0), (x1, y1), (255, 255, 255), 1, cv2.LINE_AA)
        heat = cv2.applyColorMap((expected_level[i].reshape(-1, 1).numpy() * 255).astype(np.uint8), cv2.COLORMAP_JET)
        for (x, y), c in zip(xy[i].reshape(-1, 2).tolist(), heat[:, 0, ::-1].tolist()):
            cv2.circle(canvas, (int(round(x)), int(round(y))), 2, tuple(int(v) for v in c), -1, cv2.LINE_AA)
        panels.append(canvas)
    data = {
        "queries": np.array(queries), "boxes": boxes[queries].numpy(), "scores": scores[queries].numpy(),
        "sampling_points": xy.numpy(), "sampling_z": record["z"][0, queries].float().numpy(),
        "level_weights": weights.numpy(), "strides": np.array(record["strides"]),
        "input_boxes": record["box"][0, queries].float().numpy(),
    }
    return np.concatenate(panels, axis=1), data


def main(args):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config_file, args.opts)
    model = build_model(cfg, args.device)
    class_names = dataset_class_names(cfg, args.dataset, getattr(model, "num_classes", None))
    augmentations, resize = test_time_augmentations(cfg, args.min_size, args.max_size)
    logger.info(f"test-time resize: {resize}")
    aug = T.AugmentationList(augmentations)
    os.makedirs(args.output, exist_ok=True)
    written = []
    for path in list_images(args.input):
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"cannot read image {path}")
        rgb = bgr[:, :, ::-1]
        aug_input = T.AugInput(np.ascontiguousarray(rgb))
        aug(aug_input)
        rgb = np.ascontiguousarray(aug_input.image)
        model_input = rgb if getattr(model, "input_format", "RGB") == "RGB" else rgb[:, :, ::-1]
        image = torch.as_tensor(np.ascontiguousarray(model_input.transpose(2, 0, 1))).to(args.device)
        if has_3d_sampling(model):
            scores, classes, boxes, record = inspect_sampling_3d(model, image, args.layer)
            record = {k: v.cpu() if torch.is_tensor(v) else v for k, v in record.items()}
        else:
            scores, classes, boxes, padded_hw, record = inspect_image(model, image, args.layer)
        scores, classes, boxes = scores.cpu(), classes.cpu(), boxes.cpu()
        queries = args.queries or scores.topk(min(args.topk, scores.numel())).indices.tolist()
        if has_3d_sampling(model):
            picture, data = draw_sampling_3d(rgb, queries, scores, classes, boxes, record, class_names)
        else:
            picture, data = draw(rgb, queries, scores, classes, boxes, padded_hw, record, class_names)
        stem = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0] + "_attention")
        cv2.imwrite(stem + ".png", picture[:, :, ::-1])
        layer_name = record["name"] if isinstance(record, dict) else record.name
        if args.save_data:
            np.savez(stem + ".npz", layer=layer_name, **data)
        logger.info(f"{path}: queries {queries} of {layer_name} -> {stem}.png")
        written.append(stem + ".png")
    return written


if __name__ == "__main__":
    main(get_parser().parse_args())
