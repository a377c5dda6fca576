"""SD-DETR's losses: Conditional DETR's focal set loss, or the task-alignment loss.

With ``alignment_loss=True`` (the paper's section 3.2.3), for every decoder prediction set:

* **alignment metric** of each positive query ``i`` (matched to ground truth ``g``):
  ``t_i = s_i^α · u_i^β`` with ``s_i`` its (sigmoid) score of ``g``'s class and ``u_i`` the IoU of
  its box with ``g``'s, both detached; α = 1, β = 6 are TOOD's. As in TOOD, ``t`` is normalised per
  ground truth, ``t̂_i = t_i / max_{j→g} t_j · max_{j→g} u_j`` (``normalize_alignment``): without it
  ``t < s`` whenever ``u < 1`` at α = 1, so the target would drag every positive score to zero;
* **loss**: the soft target ``t̂`` replaces the positive's binary label in a focal-weighted BCE
  over all queries and classes, ``Σ |y - p|^γ · BCE(p, y)`` (TOOD's task-aligned / GFL's quality
  focal loss, γ = 2; ``y = t̂`` at (positive, its class), 0 elsewhere), divided by the number of
  positives; the L1 and GIoU box losses are divided by the same number;
* **repeated positives**: for the auxiliary (intermediate) layers every ground truth is repeated
  ``positive_repeats`` times in the Hungarian matching, so it gets that many positive queries
  (Align-DETR's mixed matching, k = 2, capped so that k·n ≤ Q/2); the last layer keeps one-to-one
  matching, so inference stays free of NMS.

The mini-detector's ``enc_outputs`` keep the class-agnostic focal loss of two-stage Deformable
DETR. With ``alignment_loss=False`` this is exactly :class:`~d2detr.modeling.criterion.SetCriterion`.
"""
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from d2detr.modeling.criterion import SetCriterion
from d2detr.modeling.matcher import check_matcher_inputs

__all__ = ["SDDETRCriterion", "task_alignment_targets", "task_aligned_focal_loss"]


def task_alignment_targets(scores: Tensor, ious: Tensor, groups: Tensor, alpha: float = 1.0, beta: float = 6.0,
                           normalize: bool = True, eps: float = 1e-8) -> Tensor:
    """``t = scores^alpha * ious^beta`` for ``[N]`` positives; with ``normalize`` (TOOD),
    ``t / max t * max iou`` within each ``groups`` id (the ground truth each positive is matched to)."""
    if not (scores.shape == ious.shape == groups.shape) or scores.dim() != 1:
        raise ValueError(f"scores, ious and groups must be 1-D and alike, got {tuple(scores.shape)}, "
                         f"{tuple(ious.shape)}, {tuple(groups.shape)}")
    t = scores.clamp(min=0).pow(alpha) * ious.clamp(min=0).pow(beta)
    if not normalize or t.numel() == 0:
        return t
    n = int(groups.max()) + 1
    max_t = t.new_zeros(n).scatter_reduce(0, groups, t, reduce="amax", include_self=False)
    max_u = ious.new_zeros(n).scatter_reduce(0, groups, ious, reduce="amax", include_self=False)
    return t / (max_t[groups] + eps) * max_u[groups]


def task_aligned_focal_loss(logits: Tensor, targets: Tensor, gamma: float = 2.0) -> Tensor:
    """``Σ |targets - sigmoid(logits)|^gamma · BCE(logits, targets)`` (soft targets in [0, 1])."""
    prob = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (bce * (targets - prob).abs().pow(gamma)).sum()


class SDDETRCriterion(SetCriterion):
    """:class:`~d2detr.modeling.criterion.SetCriterion` plus the task-alignment loss.

    Args (besides SetCriterion's):
        alignment_loss: the paper's alignment loss on the decoder sets (the third ablation flag).
        alignment_alpha, alignment_beta: exponents of the score and the IoU in ``t`` (TOOD: 1, 6).
        alignment_gamma: focusing parameter γ (2).
        normalize_alignment: TOOD's per-ground-truth normalisation of ``t``.
        positive_repeats: copies of each ground truth in the matching of the auxiliary layers (2).
    """

    def __init__(self, *args, alignment_loss: bool = True, alignment_alpha: float = 1.0,
                 alignment_beta: float = 6.0, alignment_gamma: float = 2.0, normalize_alignment: bool = True,
                 positive_repeats: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        if positive_repeats < 1:
            raise ValueError(f"positive_repeats must be >= 1, got {positive_repeats}")
        if alignment_loss and not self.use_focal:
            raise ValueError("the alignment loss is a sigmoid loss: it needs use_focal=True")
        if alignment_loss and not hasattr(self.matcher, "cost_matrix"):
            raise TypeError(f"repeated positives need a matcher with cost_matrix(); got {type(self.matcher).__name__}")
        self.alignment_loss = alignment_loss
        self.alignment_alpha = alignment_alpha
        self.alignment_beta = alignment_beta
        self.alignment_gamma = alignment_gamma
        self.normalize_alignment = normalize_alignment
        self.positive_repeats = positive_repeats

    @torch.no_grad()
    def match_repeated(self, outputs: Dict, targets: List[Dict[str, Tensor]], repeats: int) -> List[Tuple[Tensor, Tensor]]:
        """Hungarian matching with every ground truth repeated ``k = min(repeats, Q // (2n))`` (>= 1)
        times: ``(query_idx, target_idx)`` per image, sorted by target."""
        if repeats == 1:
            return self.matcher(outputs, targets)
        check_matcher_inputs(outputs, targets, self.use_focal)  # every worker raises together
        sizes = [len(t["boxes"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty.clone()) for _ in sizes]
        num_queries = outputs["pred_logits"].shape[1]
        C = self.matcher.cost_matrix(outputs, targets).cpu()
        if not torch.isfinite(C).all():
            raise FloatingPointError("SDDETRCriterion: non-finite matching cost (NaN/inf predictions?)")
        indices = []
        for i, c in enumerate(C.split(sizes, -1)):
            n = sizes[i]
            if n == 0:
                indices.append((empty, empty.clone()))
                continue
            k = max(1, min(repeats, num_queries // (2 * n)))
            rows, cols = linear_sum_assignment(c[i].repeat(1, k).numpy())
            cols = torch.as_tensor(cols % n, dtype=torch.int64)
            order = torch.argsort(cols, stable=True)
            indices.append((torch.as_tensor(rows, dtype=torch.int64)[order], cols[order]))
        return indices

    def loss_alignment(self, outputs, targets, indices, num_pos) -> Dict[str, Tensor]:
        logits = outputs["pred_logits"].float()
        batch_idx, query_idx = (i.to(logits.device) for i in self._src_permutation_idx(indices))
        labels = torch.cat([t["labels"][J] for t, (_, J) in zip(targets, indices)]).to(logits.device, torch.long)
        # group id of each positive: its (image, ground truth) pair
        offsets = torch.cumsum(torch.tensor([0] + [len(t["labels"]) for t in targets[:-1]]), 0)
        groups = torch.cat([J + o for (_, J), o in zip(indices, offsets.tolist())]).to(logits.device)
        with torch.no_grad():
            scores = logits[batch_idx, query_idx, labels].sigmoid()
            ious = self.matched_pair_ious(outputs, targets, indices).to(scores.device)
            t = task_alignment_targets(scores, ious, groups, self.alignment_alpha, self.alignment_beta,
                                       self.normalize_alignment)
        soft = torch.zeros_like(logits)
        soft[batch_idx, query_idx, labels] = t
        return {"loss_class": task_aligned_focal_loss(logits, soft, self.alignment_gamma) / num_pos}

    def compute_set_losses(self, outputs, targets, num_boxes, suffix: str = "", indices=None) -> Dict[str, Tensor]:
        if not self.alignment_loss or suffix == "_enc" or indices is not None:
            return super().compute_set_losses(outputs, targets, num_boxes, suffix, indices)
        repeats = 1 if suffix == "" else self.positive_repeats  # "" is the last decoder layer
        indices = self.match_repeated(outputs, targets, repeats)
        num_pos = num_boxes if repeats == 1 else self.get_num_boxes(
            [{"labels": src} for src, _ in indices], outputs["pred_logits"].device)
        out = {}
        for loss in self.losses:
            values = (self.loss_alignment(outputs, targets, indices, num_pos) if loss == "class"
                      else self.get_loss(loss, outputs, targets, indices, num_pos))
            for k, v in values.items():
                out[k + suffix] = v * self.weight_of(k, suffix)
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            f", alignment_loss={self.alignment_loss}, alpha={self.alignment_alpha}, beta={self.alignment_beta}, "
            f"gamma={self.alignment_gamma}, normalize={self.normalize_alignment}, "
            f"positive_repeats={self.positive_repeats}"
        )
