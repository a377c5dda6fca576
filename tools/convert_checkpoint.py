#!/usr/bin/env python
"""Converts Hugging Face transformers checkpoints into d2detr checkpoints.

    python tools/convert_checkpoint.py SOURCE OUTPUT.pth [--config-file CFG] [options]

SOURCE is a Hugging Face model folder (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``, sharded ones included) or a single weight file
(``.safetensors`` / ``.bin`` / ``.pth``; give its ``--hf-config`` when it has no
``config.json`` beside it, otherwise the sizes are read off the tensors and the
number of attention heads defaults to 8). Supported ``model_type``s:
``detr`` (DetrForObjectDetection / DetrForSegmentation's detector),
``deformable_detr`` (plain, box refinement, two-stage), ``conditional_detr``,
``dab-detr``, whatever else is registered in ``d2detr.checkpoint``, and two non-HF sources recognised by
their keys: ``torchvision_resnet`` (ImageNet ResNets -> backbone weights for
``train.init_checkpoint``) and ``detr_official`` (facebookresearch/detr).

OUTPUT.pth holds ``{"model": state_dict, "__author__": "d2detr", "overrides": {...}}``
and loads with Detectron2's ``DetectionCheckpointer`` (``train.init_checkpoint=OUTPUT.pth``).
The ``overrides`` are the config overrides that build the checkpoint's model (number of
queries, layers, backbone depth, ...). ``tools/train_net.py``, ``demo.py``, ``export_model.py``
and the other tools apply them themselves when ``train.init_checkpoint`` is that file (a key
given on the command line wins), so no copying is needed::

    python tools/train_net.py --config-file projects/detr/configs/detr_r50_500ep.py \\
        --eval-only train.init_checkpoint=detr_r50.pth

The tool also prints them, shell-quoted (``'model.backbone.out_features=[...]'``).

With ``--config-file`` it also builds that config's model with the overrides
and loads the converted weights strictly, failing on any mismatch.

Class heads: checkpoints with 91 labels indexed by COCO category id (the
facebook/detr-* and SenseTime/deformable-detr* ones) are converted to
Detectron2's 80 contiguous COCO classes by default (``--classes auto``);
``--classes keep`` keeps the head as it is.
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from d2detr.checkpoint import (  # noqa: E402
    apply_overrides,
    convert_hf_checkpoint,
    detect_model_type,
    load_hf_checkpoint,
    overrides_to_shell,
    registered_model_types,
    save_checkpoint,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Convert a Hugging Face DETR-family checkpoint (or a torchvision ResNet, "
                    "an official DETR checkpoint) to a d2detr .pth",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("source", help="HF model folder (config.json + weights) or a single weight file")
    p.add_argument("output", help="output .pth")
    p.add_argument("--hf-config", default=None, help="config.json to use (default: the one beside the weights)")
    p.add_argument("--model-type", default=None,
                   help="model_type, if neither a config nor the keys tell it "
                        f"(known: {', '.join(registered_model_types())})")
    p.add_argument("--classes", default="auto", choices=["auto", "keep", "coco80"],
                   help="class head: coco80 maps a 91-way COCO-id head to Detectron2's 80 classes; "
                        "auto does so for 91-label COCO heads (default)")
    p.add_argument("--config-file", default=None,
                   help="a d2detr LazyConfig: build its model with the overrides and load strictly to check")
    return p.parse_args(argv)


def verify(config_file, overrides, state_dict):
    import torch
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(config_file)
    apply_overrides(cfg, overrides)
    if "criterion" in cfg.model:
        cfg.model.criterion = None  # not needed to check the weights
    model = instantiate(cfg.model)
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shape = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or shape:
        raise SystemExit(
            f"{config_file} does not match the converted weights:\n"
            f"  missing   ({len(missing)}): {missing[:10]}\n"
            f"  unexpected({len(unexpected)}): {unexpected[:10]}\n"
            f"  shape     ({len(shape)}): {[(k, tuple(own[k].shape), tuple(state_dict[k].shape)) for k in shape[:10]]}"
        )
    with torch.no_grad():
        model.load_state_dict(state_dict, strict=True)
    n = sum(p.numel() for p in model.parameters())
    print(f"verified: {config_file} builds a {n / 1e6:.2f}M-parameter model that loads every tensor")


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    hf_sd, hf_cfg = load_hf_checkpoint(args.source, args.hf_config)
    model_type = args.model_type or detect_model_type(hf_sd, hf_cfg)
    state_dict, overrides = convert_hf_checkpoint(hf_sd, hf_cfg, model_type=model_type, classes=args.classes)
    if args.config_file:
        verify(args.config_file, overrides, state_dict)
    save_checkpoint(args.output, state_dict, overrides=overrides, source=os.path.abspath(args.source),
                    model_type=model_type)
    print(f"converted {model_type}: {len(hf_sd)} tensors -> {len(state_dict)} tensors, saved to {args.output}")
    if overrides:
        print(f"stored in {args.output}: {len(overrides)} config overrides that build its model; train_net.py, "
              "demo.py, export_model.py and the other tools apply them when train.init_checkpoint is this file "
              "(a key given on the command line wins). For reference, as shell arguments:")
        print("  " + overrides_to_shell(overrides))


if __name__ == "__main__":
    main()
