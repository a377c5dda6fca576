"""A tiny detector and a tiny synthetic dataset for the training-machinery tests.

The detector follows the d2detr meta-architecture contract (Detectron2 I/O; a dict of
weighted losses in training, ``[{"instances": Instances}]`` with absolute XYXY boxes
at the input's ``height``/``width`` in inference) with set prediction and Hungarian
matching, but is small enough to train for a few iterations in well under a second.
``write_toy_config`` writes a LazyConfig file that ``tools/train_net.py`` accepts,
composed from ``configs/common/{train,optim,coco_schedule}.py``.

Hooks for failure tests: ``nan_at_iter`` turns the loss into NaN at that training
iteration (on
rank ``nan_rank`` only, if given); ``kill_at_iter`` SIGKILLs the process when that iteration starts
(a simulated crash that leaves no chance to clean up).
"""
import os
import signal
import textwrap

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.utils import comm
from detectron2.structures import Boxes, BoxMode, ImageList, Instances
from detectron2.utils.events import get_event_storage
from scipy.optimize import linear_sum_assignment
from torch import nn

from d2detr.layers import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_CLASSES = ["red", "green"]
TOY_IMAGE_SIZE = (48, 64)  # H, W


class TinyDetector(nn.Module):
    def __init__(
        self, num_classes=2, num_queries=4, hidden_dim=16, nan_at_iter=-1, nan_rank=-1, kill_at_iter=-1
    ):
        super().__init__()
        self.num_classes = num_classes
        self.nan_at_iter = nan_at_iter
        self.nan_rank = nan_rank
        self.kill_at_iter = kill_at_iter
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 4, stride=4), nn.ReLU(), nn.Conv2d(8, hidden_dim, 3, stride=2), nn.ReLU()
        )
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.fuse = nn.Linear(hidden_dim, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = nn.Linear(hidden_dim, 4)
        self.register_buffer("pixel_mean", torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1), False)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = 0.1  # DETR's eos_coef
        self.register_buffer("empty_weight", empty_weight, False)

    @property
    def device(self):
        return self.pixel_mean.device

    def forward(self, batched_inputs):
        images = [(x["image"].to(self.device).float() - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(images)
        feat = self.backbone(images.tensor).mean(dim=(2, 3))  # [B, C]
        hs = F.relu(self.fuse(feat)[:, None, :] + self.query_embed.weight[None])  # [B, Q, C]
        logits = self.class_embed(hs)
        boxes = self.bbox_embed(hs).sigmoid()  # normalised cxcywh
        if self.training:
            return self.losses(logits, boxes, images.image_sizes, batched_inputs)
        return self.inference(logits, boxes, images.image_sizes, batched_inputs)

    def losses(self, logits, boxes, image_sizes, batched_inputs):
        it = get_event_storage().iter
        if it == self.kill_at_iter:
            os.kill(os.getpid(), signal.SIGKILL)
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.long, device=self.device)
        src_boxes, tgt_boxes = [], []
        for i, x in enumerate(batched_inputs):
            inst = x["instances"].to(self.device)
            h, w = image_sizes[i]
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            gt = box_xyxy_to_cxcywh(inst.gt_boxes.tensor / scale)
            with torch.no_grad():
                prob = logits[i].float().softmax(-1)
                cost = torch.cdist(boxes[i].float(), gt, p=1) - prob[:, inst.gt_classes]
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
            target_classes[i, rows] = inst.gt_classes[cols]
            src_boxes.append(boxes[i, rows])
            tgt_boxes.append(gt[cols])
        num_boxes = max(sum(len(b) for b in tgt_boxes), 1)
        loss_ce = F.cross_entropy(logits.float().transpose(1, 2), target_classes, self.empty_weight)
        loss_bbox = F.l1_loss(torch.cat(src_boxes).float(), torch.cat(tgt_boxes), reduction="sum") / num_boxes
        losses = {"loss_ce": loss_ce, "loss_bbox": 5.0 * loss_bbox}
        if it == self.nan_at_iter and self.nan_rank in (-1, comm.get_rank()):
            losses["loss_bbox"] = losses["loss_bbox"] * float("nan")
        return losses

    def inference(self, logits, boxes, image_sizes, batched_inputs):
        results = []
        scores, labels = logits.float().softmax(-1)[..., :-1].max(-1)
        for i, x in enumerate(batched_inputs):
            h, w = image_sizes[i]
            inst = Instances((h, w))
            xyxy = box_cxcywh_to_xyxy(boxes[i].float()) * torch.tensor([w, h, w, h], device=self.device)
            inst.pred_boxes = Boxes(xyxy)
            inst.scores = scores[i]
            inst.pred_classes = labels[i]
            results.append({"instances": detector_postprocess(inst, x.get("height", h), x.get("width", w))})
        return results


def _toy_dicts(root, split, num_images, seed):
    """Images of coloured rectangles on grey; class 0 red, class 1 green."""
    import cv2

    rng = np.random.RandomState(seed)
    os.makedirs(os.path.join(root, split), exist_ok=True)
    h, w = TOY_IMAGE_SIZE
    dicts = []
    for i in range(num_images):
        img = np.full((h, w, 3), 127, np.uint8)
        annos = []
        for _ in range(1 + i % 2):
            cls = int(rng.randint(2))
            x0, y0 = int(rng.randint(0, w - 20)), int(rng.randint(0, h - 20))
            bw, bh = int(rng.randint(8, 20)), int(rng.randint(8, 20))
            img[y0 : y0 + bh, x0 : x0 + bw] = (0, 0, 255) if cls == 0 else (0, 255, 0)  # BGR
            annos.append({"bbox": [x0, y0, bw, bh], "bbox_mode": BoxMode.XYWH_ABS, "category_id": cls})
        path = os.path.join(root, split, f"{i:03d}.png")
        cv2.imwrite(path, img)
        dicts.append({"file_name": path, "image_id": i, "height": h, "width": w, "annotations": annos})
    return dicts


def register_toy_datasets(root, num_train=2, num_val=3):
    """Registers "toy_train" and "toy_val" (replacing earlier registrations) with images under root."""
    for name, n, seed in (("toy_train", num_train, 0), ("toy_val", num_val, 1)):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        dicts = _toy_dicts(root, name, n, seed)
        DatasetCatalog.register(name, lambda d=dicts: d)
        MetadataCatalog.get(name).set(thing_classes=list(TOY_CLASSES))


def write_toy_config(tmp_path, **train):
    """A LazyConfig file for TinyDetector on the toy datasets; train.* keys from ``train``."""
    root = os.path.join(str(tmp_path), "data")
    out = os.path.join(str(tmp_path), "output")
    train_items = dict(
        output_dir=out, max_iter=4, device="cpu", seed=7, eval_period=0, log_period=1,
        checkpointer=dict(period=2, max_to_keep=100),
    )
    train_items.update(train)
    text = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {os.path.join(REPO, "tests")!r})
        from detectron2.config import LazyCall as L, LazyConfig
        from detectron2.data import (build_detection_test_loader, build_detection_train_loader,
                                     get_detection_dataset_dicts, DatasetMapper)
        from detectron2.data.samplers import TrainingSampler
        from detectron2.evaluation import COCOEvaluator
        from fvcore.common.param_scheduler import MultiStepParamScheduler
        from test_train_toy import TinyDetector, register_toy_datasets

        train = LazyConfig.load({os.path.join(REPO, "configs/common/train.py")!r}, "train")
        optimizer = LazyConfig.load({os.path.join(REPO, "configs/common/optim.py")!r}, "AdamW")

        register_toy_datasets({root!r})
        model = L(TinyDetector)()
        dataloader = dict(
            train=L(build_detection_train_loader)(
                dataset=L(get_detection_dataset_dicts)(names="toy_train", filter_empty=False),
                mapper=L(DatasetMapper)(is_train=True, augmentations=[], image_format="RGB"),
                # Fixed order: a resumed run sees the same batches as an uninterrupted one.
                sampler=L(TrainingSampler)(size=2, shuffle=False),
                total_batch_size=2,
                num_workers=0,
            ),
            test=L(build_detection_test_loader)(
                dataset=L(get_detection_dataset_dicts)(names="toy_val", filter_empty=False),
                mapper=L(DatasetMapper)(is_train=False, augmentations=[], image_format="RGB"),
                num_workers=0,
            ),
            evaluator=L(COCOEvaluator)(dataset_name="toy_val", output_dir=None, use_fast_impl=False),
        )
        optimizer.lr = 1e-3
        lr_multiplier = L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[3], num_updates=4)
        train.update({train_items!r})
        """
    )
    os.makedirs(str(tmp_path), exist_ok=True)
    path = os.path.join(str(tmp_path), "toy_config.py")
    with open(path, "w") as f:
        f.write(text)
    return path


# ---------------------------------------------------------------------------------------
# The toy itself keeps the meta-architecture contract the other tests rely on.


def test_tiny_detector_contract(tmp_path):
    from detectron2.data import DatasetMapper
    from detectron2.utils.events import EventStorage

    register_toy_datasets(str(tmp_path))
    mapper = DatasetMapper(is_train=True, augmentations=[], image_format="RGB")
    batch = [mapper(d) for d in DatasetCatalog.get("toy_train")]
    model = TinyDetector()
    with EventStorage(0):
        losses = model(batch)
    assert set(losses) == {"loss_ce", "loss_bbox"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())

    model.eval()
    inputs = [{"image": batch[0]["image"], "height": 96, "width": 128}]  # 2x the input size
    with torch.no_grad():
        inst = model(inputs)[0]["instances"]
    assert inst.image_size == (96, 128)
    assert len(inst) == 4 and inst.pred_boxes.tensor.max() <= 128
