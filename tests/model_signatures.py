"""What a config's model *is*, independent of how its code is organised: the parameter and buffer
names and shapes, the parameter count, and its outputs and losses with weights that depend only on
each tensor's name (:func:`fill_by_name`), so two implementations that build the same modules
under the same names give the same numbers whatever order they create them in.

``tests/data/model_signatures.json`` holds the signatures of the shipped model configs, written
by ``python tests/model_signatures.py --write`` before the multi-scale core was moved into
``d2detr/modeling``; ``tests/test_model_signatures.py`` checks that every config still resolves
to that model.
"""
import argparse
import hashlib
import json
import os
import sys
import zlib
from typing import Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIGNATURES = os.path.join(ROOT, "tests", "data", "model_signatures.json")
#: Model configs whose signatures are recorded (relative to the repository).
CONFIGS = sorted(
    os.path.relpath(os.path.join(d, f), ROOT)
    for base in ("projects",)
    for d, _, files in os.walk(os.path.join(ROOT, base))
    if d.endswith(os.path.join("configs", "models"))
    for f in files
    if f.endswith(".py")
)
IMAGE_HW = (96, 128)


def fill_by_name(model: torch.nn.Module) -> None:
    """Overwrites every floating-point parameter and buffer with values drawn from a generator
    seeded by the tensor's name: matrices ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1), running
    variances in [0.5, 1.5), other vectors ~ N(0, 0.1)."""
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point() or t.numel() == 0:
                continue
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            if name.endswith("running_var"):
                value = 0.5 + torch.rand(t.shape, generator=g)
            elif t.dim() >= 2:
                value = torch.randn(t.shape, generator=g) / max(1, t[0].numel()) ** 0.5
            elif "norm" in name.rsplit(".", 2)[-2:][0]:  # LayerNorm / GroupNorm scale and shift
                value = (1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(t.shape, generator=g)
            else:
                value = 0.1 * torch.randn(t.shape, generator=g)
            t.copy_(value.to(t.dtype))


def _no_dropout(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(m, torch.nn.MultiheadAttention):
            m.dropout = 0.0


def _image(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, *IMAGE_HW), dtype=torch.uint8, generator=g)


def _batch() -> List[Dict]:
    from detectron2.structures import Boxes, Instances

    out = []
    for i, boxes in enumerate(([[8.0, 10.0, 60.0, 50.0]], [[30.0, 4.0, 90.0, 40.0], [4.0, 36.0, 40.0, 90.0]])):
        inst = Instances(IMAGE_HW)
        inst.gt_boxes = Boxes(torch.tensor(boxes))
        inst.gt_classes = torch.arange(len(boxes)) % 3
        out.append({"image": _image(10 + i), "instances": inst})
    return out


#: Scores closer than this are ties: their order depends on the CPU's float summation order.
TIE = 1e-5


def signature(config: str) -> Dict:
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(os.path.join(ROOT, config))
    if "backbone" in cfg.model and "pretrained" in cfg.model.backbone:
        cfg.model.backbone.pretrained = False  # the names are the same; no file to read
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    state = model.state_dict()
    layout = "\n".join(f"{k} {tuple(v.shape)}" for k, v in sorted(state.items()))
    sig = {
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "state_dict_layout_sha1": hashlib.sha1(layout.encode()).hexdigest(),
        "num_state_dict_keys": len(state),
    }
    fill_by_name(model)
    _no_dropout(model)
    model.eval()
    with torch.no_grad():
        inst = model([{"image": _image(0)}])[0]["instances"]
    scores, order = inst.scores.sort(descending=True)
    sig["top_scores"] = [round(float(s), 6) for s in scores[:10]]
    sig["top_boxes"] = [[round(float(c), 4) for c in b] for b in inst.pred_boxes.tensor[order[:5]]]
    sig["box_sum"] = round(float(inst.pred_boxes.tensor.sum()), 3)
    # not recorded: every box scoring within TIE of the best (see test_model_signatures.py)
    sig["near_top_boxes"] = inst.pred_boxes.tensor[scores >= scores[0] - TIE].tolist() if len(scores) else []
    model.train()
    losses = model(_batch())
    sig["losses"] = {k: round(float(v.detach()), 6) for k, v in sorted(losses.items())}
    return sig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help=f"(re)write {os.path.relpath(SIGNATURES, ROOT)}")
    p.add_argument("configs", nargs="*", default=CONFIGS)
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    torch.set_num_threads(1)
    sigs = {c: {k: v for k, v in signature(c).items() if k != "near_top_boxes"} for c in args.configs}
    if args.write:
        os.makedirs(os.path.dirname(SIGNATURES), exist_ok=True)
        with open(SIGNATURES, "w") as f:
            json.dump(sigs, f, indent=1, sort_keys=True)
            f.write("\n")
    else:
        print(json.dumps(sigs, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
