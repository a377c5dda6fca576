#!/usr/bin/env python
"""Detectron2's tools/visualize_json_results.py, working on d2detr's datasets too.

    python tools/visualize_json_results.py --input OUTPUT/inference/coco_instances_results.json \
        --output vis/ --dataset neon_trees_val [--conf-threshold 0.5]

Draws, for every image of --dataset, the predictions of a COCOEvaluator results file (left)
next to the ground truth (right). Unlike Detectron2's script, which accepts only COCO/LVIS,
datasets without ``thing_dataset_id_to_contiguous_id`` are taken to use contiguous ids (what
COCOEvaluator writes for them). d2detr's datasets are registered first.
"""
import argparse
import json
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import tqdm  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.structures import Boxes, BoxMode, Instances  # noqa: E402
from detectron2.utils.file_io import PathManager  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402

import d2detr.data.datasets  # noqa: E402,F401  registers d2detr's datasets


def parse_args(in_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="JSON file produced by the model")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--dataset", default="coco_2017_val", help="name of the dataset")
    parser.add_argument("--conf-threshold", default=0.5, type=float, help="confidence threshold")
    return parser.parse_args(in_args)


def dataset_id_mapper(dataset: str):
    metadata = MetadataCatalog.get(dataset)
    if hasattr(metadata, "thing_dataset_id_to_contiguous_id"):
        return lambda i: metadata.thing_dataset_id_to_contiguous_id[i]
    if "lvis" in dataset:
        return lambda i: i - 1
    return lambda i: i


def create_instances(predictions, image_size, threshold, id_map):
    ret = Instances(image_size)
    score = np.asarray([x["score"] for x in predictions])
    chosen = (score > threshold).nonzero()[0]
    bbox = np.asarray([predictions[i]["bbox"] for i in chosen]).reshape(-1, 4)
    ret.scores = score[chosen]
    ret.pred_boxes = Boxes(BoxMode.convert(bbox, BoxMode.XYWH_ABS, BoxMode.XYXY_ABS))
    ret.pred_classes = np.asarray([id_map(predictions[i]["category_id"]) for i in chosen], dtype=np.int64)
    return ret


def main(args):
    logger = setup_logger(name="d2detr")
    with PathManager.open(args.input, "r") as f:
        predictions = json.load(f)
    pred_by_image = defaultdict(list)
    for p in predictions:
        pred_by_image[p["image_id"]].append(p)
    dicts = list(DatasetCatalog.get(args.dataset))
    metadata = MetadataCatalog.get(args.dataset)
    id_map = dataset_id_mapper(args.dataset)
    os.makedirs(args.output, exist_ok=True)
    written = []
    for dic in tqdm.tqdm(dicts):
        img = cv2.imread(dic["file_name"], cv2.IMREAD_COLOR)[:, :, ::-1]
        preds = create_instances(pred_by_image[dic["image_id"]], img.shape[:2], args.conf_threshold, id_map)
        vis_pred = Visualizer(img, metadata).draw_instance_predictions(preds).get_image()
        vis_gt = Visualizer(img, metadata).draw_dataset_dict(dic).get_image()
        path = os.path.join(args.output, os.path.basename(dic["file_name"]))
        cv2.imwrite(path, np.concatenate((vis_pred, vis_gt), axis=1)[:, :, ::-1])
        written.append(path)
    logger.info(f"wrote {len(written)} images to {args.output}")
    return written


if __name__ == "__main__":
    main(parse_args())
