"""COCOEvaluator (pure-Python pycocotools path, as Detectron2 without _C runs it) on a
tiny dataset: a hand-made perfect prediction scores AP 100, wrong ones score lower."""
import copy

import pytest
import torch
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog, build_detection_test_loader
from detectron2.data import transforms as T
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, BoxMode, Instances
from torch import nn

NAME = "d2detr_eval_toy"
# Non-contiguous dataset ids, as in COCO: the evaluator must map 0/1 back to 1/3.
ID_MAP = {1: 0, 3: 1}
# (XYWH box, contiguous class) per image; sizes cover COCO's small/medium/large ranges.
IMAGES = [
    [([10, 12, 20, 16], 0), ([60, 40, 70, 90], 1)],
    [([5, 5, 150, 120], 0)],
    [([30, 30, 8, 9], 1), ([100, 20, 40, 50], 0), ([120, 100, 50, 40], 1)],
]
H, W = 160, 200


@pytest.fixture
def dataset(tmp_path):
    import cv2
    import numpy as np

    dicts = []
    for i, objs in enumerate(IMAGES):
        path = str(tmp_path / f"{i}.png")
        cv2.imwrite(path, np.zeros((H, W, 3), np.uint8))
        annos = [{"bbox": box, "bbox_mode": BoxMode.XYWH_ABS, "category_id": c} for box, c in objs]
        dicts.append({"file_name": path, "image_id": 100 + i, "height": H, "width": W, "annotations": annos})
    DatasetCatalog.register(NAME, lambda: copy.deepcopy(dicts))
    MetadataCatalog.get(NAME).set(thing_classes=["cat", "dog"], thing_dataset_id_to_contiguous_id=ID_MAP)
    yield dicts
    DatasetCatalog.remove(NAME)
    MetadataCatalog.remove(NAME)


def _prediction(boxes_xywh, classes, scores, size=(H, W)):
    inst = Instances(size)
    boxes = torch.tensor(boxes_xywh, dtype=torch.float32).reshape(-1, 4)
    inst.pred_boxes = Boxes(BoxMode.convert(boxes, BoxMode.XYWH_ABS, BoxMode.XYXY_ABS))
    inst.pred_classes = torch.tensor(classes, dtype=torch.int64)
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    return {"instances": inst}


def _evaluate(tmp_path, dicts, make_prediction):
    evaluator = COCOEvaluator(NAME, output_dir=str(tmp_path / "eval"), use_fast_impl=False)
    evaluator.reset()
    for i, d in enumerate(dicts):
        evaluator.process([{"image_id": d["image_id"]}], [make_prediction(i, IMAGES[i])])
    return evaluator.evaluate()["bbox"]


def _perfect(i, objs):
    return _prediction([b for b, _ in objs], [c for _, c in objs], [0.9] * len(objs))


def test_perfect_prediction_scores_100(tmp_path, dataset):
    res = _evaluate(tmp_path, dataset, _perfect)
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AP-cat", "AP-dog"):
        assert res[key] == pytest.approx(100.0), key


def test_low_scored_false_positives_do_not_lower_ap(tmp_path, dataset):
    def with_extras(i, objs):
        boxes = [b for b, _ in objs] + [[150, 130, 30, 20]]
        return _prediction(boxes, [c for _, c in objs] + [0], [0.9] * len(objs) + [0.1])

    assert _evaluate(tmp_path, dataset, with_extras)["AP"] == pytest.approx(100.0)


def test_wrong_predictions_score_lower(tmp_path, dataset):
    def top_scored_false_positive(i, objs):
        boxes = [b for b, _ in objs] + [[150, 130, 30, 20]]
        return _prediction(boxes, [c for _, c in objs] + [0], [0.5] * len(objs) + [0.99])

    def swapped_classes(i, objs):
        return _prediction([b for b, _ in objs], [1 - c for _, c in objs], [0.9] * len(objs))

    def shifted(i, objs):  # IoU 1/3 with the ground truth: a miss at every threshold
        return _prediction([[x + w / 2, y, w, h] for (x, y, w, h), _ in objs], [c for _, c in objs], [0.9] * len(objs))

    def loose(i, objs):  # IoU ~0.64: a hit at AP50, a miss at AP75
        return _prediction(
            [[x, y, w * 1.25, h * 1.25] for (x, y, w, h), _ in objs], [c for _, c in objs], [0.9] * len(objs)
        )

    assert 0 < _evaluate(tmp_path, dataset, top_scored_false_positive)["AP"] < 100
    assert _evaluate(tmp_path, dataset, swapped_classes)["AP"] == pytest.approx(0.0)
    assert _evaluate(tmp_path, dataset, shifted)["AP"] == pytest.approx(0.0)
    res = _evaluate(tmp_path, dataset, loose)
    assert res["AP50"] == pytest.approx(100.0) and res["AP75"] == pytest.approx(0.0)
    assert 0 < res["AP"] < 100


class _Oracle(nn.Module):
    """Predicts the ground truth in the resized input's frame, as a detector would,
    then maps back to the original image with detector_postprocess."""

    def __init__(self, dicts):
        super().__init__()
        self.gt = {d["image_id"]: d["annotations"] for d in dicts}

    def forward(self, inputs):
        outs = []
        for x in inputs:
            h, w = x["image"].shape[-2:]
            sy, sx = h / x["height"], w / x["width"]
            annos = self.gt[x["image_id"]]
            boxes = [[a["bbox"][0] * sx, a["bbox"][1] * sy, a["bbox"][2] * sx, a["bbox"][3] * sy] for a in annos]
            pred = _prediction(boxes, [a["category_id"] for a in annos], [1.0] * len(annos), size=(h, w))
            outs.append({"instances": detector_postprocess(pred["instances"], x["height"], x["width"])})
        return outs


def test_inference_on_dataset_with_resized_inputs(tmp_path, dataset):
    """The whole evaluation path of train_net: test loader (inputs resized to 320
    short edge), model outputs rescaled to height/width, COCOEvaluator."""
    loader = build_detection_test_loader(
        dataset=DatasetCatalog.get(NAME),
        mapper=DatasetMapper(is_train=False, augmentations=[T.ResizeShortestEdge(320, 1333)], image_format="RGB"),
        num_workers=0,
    )
    evaluator = COCOEvaluator(NAME, output_dir=str(tmp_path / "eval"), use_fast_impl=False)
    res = inference_on_dataset(_Oracle(dataset), loader, evaluator)["bbox"]
    assert res["AP"] == pytest.approx(100.0, abs=1e-6)
