"""Hungarian matching between predictions and ground truth (DETR / Deformable DETR)."""
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
from detectron2.utils import comm
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from d2detr.layers.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["HungarianMatcher", "check_matcher_inputs", "label_range_message"]


def check_matcher_inputs(outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]], use_focal: bool) -> None:
    """Raises on every DDP worker together, before any matching, when on at least one worker the
    predictions (``pred_logits``, ``pred_boxes``) are not finite (``FloatingPointError``: an
    overflow would otherwise raise inside the assignment of that worker alone, leaving the others
    waiting in the next all-reduce) or a target label is not a class of the model (``ValueError``;
    ``num_classes`` is the logits' width, minus the no-object logit without ``use_focal``).
    One all-reduce of a ``[2, world_size]`` flag; the messages name the workers."""
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    num_classes = logits.shape[-1] - (0 if use_focal else 1)
    world, rank = comm.get_world_size(), comm.get_rank()
    flags = torch.zeros(2, world, dtype=torch.float32, device=logits.device)
    flags[0, rank] = (~torch.isfinite(logits.detach()).all() | ~torch.isfinite(boxes.detach()).all()).float()
    labels = [t["labels"] for t in targets if len(t["labels"])]
    if labels:
        labels = torch.cat(labels).to(logits.device)
        flags[1, rank] = ((labels < 0) | (labels >= num_classes)).any().float()
    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(flags)
    bad = flags.cpu() > 0
    if bad[0].any():
        ranks = bad[0].nonzero().flatten().tolist()
        where = f" on worker(s) {ranks} of {world}" if world > 1 else ""
        raise FloatingPointError(
            f"non-finite predictions (NaN/inf in pred_logits or pred_boxes, found before matching){where}"
        )
    if bad[1].any():
        ranks = bad[1].nonzero().flatten().tolist()
        where = f" on worker(s) {ranks} of {world}" if world > 1 else ""
        mine = ""
        if bad[1, rank]:
            found = sorted({int(v) for v in labels.tolist() if not 0 <= v < num_classes})
            mine = f" (labels {found} here)"
        raise ValueError(label_range_message(num_classes, where + mine))


def label_range_message(num_classes: int, detail: str = "") -> str:
    """The one error text for target labels outside the model's classes (the matcher's check and
    the denoising label embedding's); ``detail`` says where / which labels."""
    return (
        f"target labels outside 0..{num_classes - 1} (the model has {num_classes} classes){detail}; "
        "the dataset's category ids do not fit model.num_classes (DetrDatasetMapper(num_classes=...) "
        "names the record)"
    )


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising
    ``cost_class * C_cls + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU)``.

    ``use_focal=False``: DETR's ``C_cls = -softmax(p)[target]`` (logits have a
    trailing no-object class). ``use_focal=True``: Deformable DETR's focal cost
    ``alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))`` with sigmoid ``p``.

    ``l1_box_format="xyxy"`` takes the L1 cost between XYXY instead of cxcywh boxes (mmdet's
    ``BBoxL1Cost(box_format="xyxy")``, AdaMixer / DEQDet).

    ``forward(outputs, targets)``: ``outputs["pred_logits"] [B,Q,C(+1)]``,
    ``outputs["pred_boxes"] [B,Q,4]`` normalised cxcywh; ``targets`` a list of
    dicts with ``labels [n]`` and ``boxes [n,4]`` (normalised cxcywh). Returns one
    ``(query_idx, target_idx)`` pair of int64 CPU tensors per image, of length
    ``min(Q, n)``; images without targets get empty tensors. ``forward(..., repeat=k)`` matches
    against each image's targets repeated ``k`` times (one-to-many, as
    :func:`~d2detr.modeling.hybrid_matching.repeat_targets` orders them: copy ``j`` of target ``t``
    is index ``j * n + t``), computing the costs once per target. Non-finite predictions and labels
    that are not classes of the model raise on every DDP worker together
    (:func:`check_matcher_inputs`).
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        use_focal: bool = False,
        alpha: float = 0.25,
        gamma: float = 2.0,
        l1_box_format: str = "cxcywh",
    ):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all costs can't be 0")
        if l1_box_format not in ("cxcywh", "xyxy"):
            raise ValueError(f"l1_box_format must be 'cxcywh' or 'xyxy', got {l1_box_format!r}")
        self.l1_box_format = l1_box_format
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.use_focal = use_focal
        self.alpha = alpha
        self.gamma = gamma

    def class_cost(self, logits: Tensor, tgt_ids: Tensor) -> Tensor:
        """``logits [N,C]`` (flattened queries) -> ``[N, len(tgt_ids)]``."""
        if self.use_focal:
            prob = logits.sigmoid()
            neg = (1 - self.alpha) * (prob**self.gamma) * (-(1 - prob + 1e-8).log())
            pos = self.alpha * ((1 - prob) ** self.gamma) * (-(prob + 1e-8).log())
            return pos[:, tgt_ids] - neg[:, tgt_ids]
        return -logits.softmax(-1)[:, tgt_ids]

    @torch.no_grad()
    def cost_matrix(self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]]) -> Tensor:
        """The ``[B, Q, sum(n_i)]`` cost matrix (on the predictions' device)."""
        bs, nq = outputs["pred_logits"].shape[:2]
        logits = outputs["pred_logits"].flatten(0, 1).float()
        out_bbox = outputs["pred_boxes"].flatten(0, 1).float()
        tgt_ids = torch.cat([t["labels"] for t in targets]).to(logits.device, torch.long)
        tgt_bbox = torch.cat([t["boxes"] for t in targets]).to(out_bbox)
        cost_class = self.class_cost(logits, tgt_ids)
        if self.l1_box_format == "xyxy":
            cost_bbox = torch.cdist(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox), p=1)
        else:
            cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))
        C = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        return C.view(bs, nq, -1)

    @torch.no_grad()
    def forward(
        self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]], repeat: int = 1
    ) -> List[Tuple[Tensor, Tensor]]:
        if repeat < 1:
            raise ValueError(f"the matcher's repeat must be >= 1, got {repeat}")
        check_matcher_inputs(outputs, targets, self.use_focal)  # on every worker, even without targets
        sizes = [len(t["boxes"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty.clone()) for _ in sizes]
        C = self.cost_matrix(outputs, targets).cpu()
        if not torch.isfinite(C).all():
            raise FloatingPointError("HungarianMatcher: non-finite cost (NaN/inf predictions?)")
        indices = []
        for i, c in enumerate(C.split(sizes, -1)):
            if sizes[i] == 0:
                indices.append((empty, empty.clone()))
                continue
            cost = c[i] if repeat == 1 else c[i].repeat(1, repeat)  # the copies' identical columns
            row, col = linear_sum_assignment(cost.numpy())
            indices.append(
                (torch.as_tensor(row, dtype=torch.int64), torch.as_tensor(col, dtype=torch.int64))
            )
        return indices

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}, "
            f"use_focal={self.use_focal}, alpha={self.alpha}, gamma={self.gamma}, l1_box_format={self.l1_box_format}"
        )
