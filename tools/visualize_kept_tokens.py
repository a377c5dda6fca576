#!/usr/bin/env python
"""Which tokens does Focus-DETR's encoder keep? The paper's picture of the retained tokens on
every feature level (Focus-DETR, ICCV 2023, Fig. 7).

    python tools/visualize_kept_tokens.py --config-file projects/focus_detr/configs/focus_detr_r50_4scale_12ep.py \
        --input img.jpg [more images/folders] --output out/ [--layer 0] [--save-data] train.init_checkpoint=model.pth

For each image (test-resized as in evaluation): one panel per feature level, fine to coarse,
with the cells of the tokens encoder layer ``--layer`` updates shown in colour (their foreground
probability as the colour) and the others dimmed, then one panel with the finest level's
foreground probability map. Layer 0 keeps ``int(0.5 * valid tokens) + 1`` tokens; each later
layer the best-scored share of them given by the cascade.

Writes <output>/<image>_kept_tokens.png and, with --save-data, <image>_kept_tokens.npz (per level
the kept mask and the foreground probabilities, and the level shapes).
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402

from d2detr.export import ExportableDetector  # noqa: E402
from d2detr.export.cli import build_model, list_images, load_config  # noqa: E402

logger = logging.getLogger("d2detr.visualize_kept_tokens")


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", nargs="+", required=True, help="image files and/or folders")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--layer", type=int, default=0, help="encoder layer whose kept tokens to draw (default 0)")
    parser.add_argument("--min-size", type=int, default=800, help="test-time shortest edge (0: no resize)")
    parser.add_argument("--max-size", type=int, default=1333)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--save-data", action="store_true", help="also write the numbers (.npz)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="key=value config overrides")
    return parser


@torch.no_grad()
def kept_token_maps(model, image: torch.Tensor, layer: int = 0):
    """Runs ``model`` on one ``[3, H, W]`` image. Returns ``(kept, probs, padded (H', W'))``: per
    level a ``[h, w]`` bool array of the tokens encoder layer ``layer`` updates and a ``[h, w]``
    array of the foreground probabilities."""
    wrapper = ExportableDetector(model)
    images, masks, _ = wrapper.preprocess(image)
    if wrapper.needs_targets:
        outputs = model.forward_features(images, masks, targets=None)
    else:
        outputs = model.forward_features(images, masks)
    if "kept_token_index" not in outputs:
        raise TypeError(f"{type(model).__name__} reports no kept tokens: this tool draws Focus-DETR's sparse encoder")
    kept_index = outputs["kept_token_index"]
    if not -len(kept_index) <= layer < len(kept_index):
        raise ValueError(f"--layer {layer}: the encoder has {len(kept_index)} layers")
    index = kept_index[layer][0]
    index = index[: min(index.numel(), int(outputs["kept_token_count"][0]))]  # what this image writes back
    probs = outputs["foreground_logits"][0].float().sigmoid().cpu()
    flat = torch.zeros_like(probs, dtype=torch.bool)
    flat[index.cpu()] = True
    kept, prob_maps, start = [], [], 0
    for h, w in outputs["foreground_spatial_shapes"].tolist():
        kept.append(flat[start:start + h * w].view(h, w).numpy())
        prob_maps.append(probs[start:start + h * w].view(h, w).numpy())
        start += h * w
    return kept, prob_maps, tuple(images.tensor.shape[-2:])


def _upsample(grid: np.ndarray, padded_hw, hw):
    """A per-cell map of a padded input, resized to the input and cropped to the image."""
    Hp, Wp = padded_hw
    out = cv2.resize(grid.astype(np.float32), (Wp, Hp), interpolation=cv2.INTER_NEAREST)
    return out[: hw[0], : hw[1]]


def draw_kept_tokens(rgb: np.ndarray, kept, probs, padded_hw) -> np.ndarray:
    """One RGB picture: a panel per level (kept cells coloured by foreground probability, the
    others dimmed, titled with the level's kept count), then the finest level's probability map."""
    H, W = rgb.shape[:2]
    panels = []
    for lvl, (mask, prob) in enumerate(zip(kept, probs)):
        keep = _upsample(mask, padded_hw, (H, W)) > 0.5
        heat = cv2.applyColorMap((_upsample(prob, padded_hw, (H, W)) * 255).astype(np.uint8), cv2.COLORMAP_JET)
        heat = heat[:, :, ::-1]
        canvas = (rgb * 0.3).astype(np.uint8)
        canvas[keep] = (0.45 * rgb[keep] + 0.55 * heat[keep]).astype(np.uint8)
        canvas = np.ascontiguousarray(canvas)
        h, w = mask.shape
        cv2.putText(canvas, f"level {lvl} ({h}x{w}): {int(mask.sum())} kept", (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (255, 255, 255), 1, cv2.LINE_AA)
        panels.append(canvas)
    heat = cv2.applyColorMap((_upsample(probs[0], padded_hw, (H, W)) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    canvas = np.ascontiguousarray(cv2.addWeighted(rgb, 0.4, heat[:, :, ::-1], 0.6, 0))
    cv2.putText(canvas, "foreground probability, level 0", (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                (255, 255, 255), 1, cv2.LINE_AA)
    panels.append(canvas)
    return np.concatenate(panels, axis=1)


def main(args):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config_file, args.opts)
    model = build_model(cfg, args.device)
    aug = T.ResizeShortestEdge(args.min_size, args.max_size) if args.min_size > 0 else None
    os.makedirs(args.output, exist_ok=True)
    written = []
    for path in list_images(args.input):
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"cannot read image {path}")
        rgb = bgr[:, :, ::-1]
        if aug is not None:
            rgb = aug.get_transform(rgb).apply_image(rgb)
        rgb = np.ascontiguousarray(rgb)
        model_input = rgb if getattr(model, "input_format", "RGB") == "RGB" else rgb[:, :, ::-1]
        image = torch.as_tensor(np.ascontiguousarray(model_input.transpose(2, 0, 1))).to(args.device)
        kept, probs, padded_hw = kept_token_maps(model, image, args.layer)
        picture = draw_kept_tokens(rgb, kept, probs, padded_hw)
        stem = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0] + "_kept_tokens")
        cv2.imwrite(stem + ".png", picture[:, :, ::-1])
        if args.save_data:
            np.savez(stem + ".npz", layer=args.layer, shapes=np.array([m.shape for m in kept]),
                     **{f"kept_{l}": m for l, m in enumerate(kept)}, **{f"probability_{l}": p for l, p in enumerate(probs)})
        logger.info(f"{path}: encoder layer {args.layer} keeps {sum(int(m.sum()) for m in kept)} tokens -> {stem}.png")
        written.append(stem + ".png")
    return written


if __name__ == "__main__":
    main(get_parser().parse_args())
