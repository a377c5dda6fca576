#!/usr/bin/env python
"""Detectron2's tools/visualize_data.py for d2detr's LazyConfigs and datasets.

    python tools/visualize_data.py --config-file CFG --source annotation --output-dir out/ [key=value ...]
    python tools/visualize_data.py --config-file CFG --source dataloader --output-dir out/ [--num-images 8]

--source annotation draws the ground truth of the training dataset(s) as stored
(cfg.dataloader.train.dataset.names); --source dataloader draws what the model is trained on:
the train loader's images after the mapper's augmentations, with their boxes. Same workflow and
output as Detectron2's script (which reads only yacs configs); d2detr's datasets are registered
first.
"""
import argparse
import os
import sys
from itertools import chain

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tqdm  # noqa: E402
from detectron2.config import instantiate  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data import detection_utils as utils  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402

import d2detr.data.datasets  # noqa: E402,F401  registers d2detr's datasets
from d2detr.export.cli import load_config  # noqa: E402


def parse_args(in_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=["annotation", "dataloader"], required=True,
                        help="visualize the annotations or the data loader (with pre-processing)")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig file")
    parser.add_argument("--output-dir", default="./", help="path to output directory")
    parser.add_argument("--num-images", type=int, default=0, help="stop after this many images (0: all)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="key=value config overrides")
    return parser.parse_args(in_args)


def _train_names(cfg):
    names = cfg.dataloader.train.dataset.names
    return [names] if isinstance(names, str) else list(names)


def main(args):
    logger = setup_logger(name="d2detr")
    cfg = load_config(args.config_file, args.opts)
    os.makedirs(args.output_dir, exist_ok=True)
    names = _train_names(cfg)
    metadata = MetadataCatalog.get(names[0])
    written = []

    def output(vis, fname):
        path = os.path.join(args.output_dir, fname)
        logger.info(f"Saving to {path} ...")
        vis.save(path)
        written.append(path)

    if args.source == "dataloader":
        cfg.dataloader.train.num_workers = 0
        input_format = cfg.dataloader.train.mapper.get("image_format", "RGB")
        for batch in instantiate(cfg.dataloader.train):
            for per_image in batch:
                img = per_image["image"].permute(1, 2, 0).cpu().numpy()
                img = utils.convert_image_to_rgb(img, input_format)
                fields = per_image["instances"].get_fields()
                labels = [metadata.thing_classes[i] for i in fields["gt_classes"]]
                vis = Visualizer(img, metadata=metadata).overlay_instances(
                    labels=labels, boxes=fields.get("gt_boxes", None)
                )
                output(vis, f"{per_image['image_id']}.jpg")
                if args.num_images and len(written) >= args.num_images:
                    return written
    else:
        dicts = list(chain.from_iterable(DatasetCatalog.get(k) for k in names))
        for dic in tqdm.tqdm(dicts):
            img = utils.read_image(dic["file_name"], "RGB")
            vis = Visualizer(img, metadata=metadata).draw_dataset_dict(dic)
            output(vis, os.path.basename(dic["file_name"]))
            if args.num_images and len(written) >= args.num_images:
                break
    return written


if __name__ == "__main__":
    main(parse_args())
