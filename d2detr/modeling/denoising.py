"""Contrastive denoising queries (DINO, Zhang et al., ICLR 2023; after DN-DETR).

In training, every ground-truth box is fed to the decoder again as noised queries, in groups:
each group holds ``max_gt`` *positive* queries (a box jittered by less than half its size, to be
reconstructed) and ``max_gt`` *negative* ones (jittered by between one and two halves, to be
rejected as background), ``max_gt`` being the largest number of objects of an image in the batch;
images with fewer objects leave padding slots. A self-attention mask keeps the matching queries
from seeing the denoising ones (they would read the answer) and the groups from seeing each
other. Inference never builds them.

Follows the official ``prepare_for_cdn`` (IDEA-Research/DINO, ``models/dino/dn_components.py``):

* ``num_groups = max(1, num_dn_queries // max_gt)`` (so about ``2 * num_dn_queries`` queries);
  with more objects than ``num_dn_queries`` a single group;
* label noise: each query's label is replaced by a uniformly random class with probability
  ``label_noise_ratio / 2``; content = ``label_enc(label)`` (zeros on padding slots);
* box noise on the corners: ``corner += s * u * (w/2, h/2) * box_noise_scale`` with a random sign
  ``s``, ``u ~ U[0, 1)`` for positives and ``U[1, 2)`` for negatives, clamped to the image;
  the reference box is ``sigmoid(inverse_sigmoid(box, eps))`` (padding slots: box logits 0);
* layout per image: ``[g0 positives | g0 negatives | g1 positives | ...]``, each block
  ``max_gt`` long; the positive query of target ``t`` in group ``g`` is at ``2 * g * max_gt + t``.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from d2detr.layers.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid

__all__ = ["ContrastiveDenoising", "DenoisingQueries", "denoising_attn_mask", "denoising_match_indices"]


def denoising_attn_mask(num_groups: int, max_gt: int, num_matching: int, device=None) -> Optional[Tensor]:
    """``[P + Q, P + Q]`` bool self-attention mask, True = may not attend, for ``P = 2 * max_gt *
    num_groups`` denoising queries followed by ``Q = num_matching`` matching queries: the matching
    queries do not see the denoising ones, a group sees only itself and the matching queries.
    None when there are no denoising queries."""
    p = 2 * max_gt * num_groups
    if p == 0:
        return None
    mask = torch.zeros(p + num_matching, p + num_matching, dtype=torch.bool, device=device)
    mask[p:, :p] = True
    group = torch.arange(p, device=device) // (2 * max_gt)
    mask[:p, :p] = group[:, None] != group[None, :]
    return mask


def denoising_match_indices(targets: List[Dict[str, Tensor]], meta: Dict[str, int]):
    """The fixed assignment of the positive denoising queries to their targets, in the matcher's
    format: per image ``(query_idx, target_idx)`` int64 CPU tensors."""
    m, groups = meta["max_gt"], meta["num_groups"]
    out = []
    for t in targets:
        n = len(t["labels"])
        tgt = torch.arange(n, dtype=torch.int64).repeat(groups)
        query = (torch.arange(groups, dtype=torch.int64) * 2 * m).repeat_interleave(n) + tgt
        out.append((query, tgt))
    return out


@dataclass
class DenoisingQueries:
    """The denoising part of a training step's decoder input (see the module docstring)."""

    tgt: Tensor  #: ``[N, P, C]`` content queries
    reference_points: Tensor  #: ``[N, P, 4]`` reference boxes (cx, cy, w, h) in [0, 1]
    num_groups: int
    max_gt: int

    @property
    def num_queries(self) -> int:
        return self.tgt.shape[1]

    @property
    def meta(self) -> Dict[str, int]:
        """What the criterion needs: ``num_groups``, ``max_gt`` (block length), ``num_queries``."""
        return {"num_groups": self.num_groups, "max_gt": self.max_gt, "num_queries": self.num_queries}

    def attn_mask(self, num_matching: int) -> Optional[Tensor]:
        return denoising_attn_mask(self.num_groups, self.max_gt, num_matching, self.tgt.device)


class ContrastiveDenoising(nn.Module):
    """Builds :class:`DenoisingQueries` from a batch's targets.

    Args:
        num_classes: classes of the detector (labels are ``0 .. num_classes - 1``).
        embed_dim: width of the content queries.
        num_dn_queries: the budget that sets the number of groups (DINO's ``dn_number``, 100).
        label_noise_ratio: twice the probability of flipping a label (0.5 -> 0.25).
        box_noise_scale: DINO's lambda (1.0 in every official training script; the config file says 0.4).
        label_book_size: rows of the label embedding minus one (official ``dn_labelbook_size``);
            default ``num_classes``.
        unknown_label: keep that extra last row (DN-DETR's "unknown" label, never drawn; the
            official DINO has it). False: ``label_book_size`` rows (detrex's DINO and Focus-DETR).

    ``inverse_sigmoid_eps`` (1e-3 in DINO) is set by the detector. ``forward(targets)`` takes the
    criterion's targets (``labels [n]``, ``boxes [n, 4]`` normalised cxcywh) and returns the
    queries; with no object in the batch there are none (``P = 0``), but the returned object keeps
    the loss keys of the step the same.
    """

    def __init__(
        self,
        num_classes: int,
        embed_dim: int = 256,
        num_dn_queries: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
        label_book_size: Optional[int] = None,
        unknown_label: bool = True,
    ):
        super().__init__()
        if num_dn_queries < 1:
            raise ValueError(f"num_dn_queries must be positive, got {num_dn_queries}")
        label_book_size = num_classes if label_book_size is None else label_book_size
        if label_book_size < num_classes:
            raise ValueError(f"label_book_size ({label_book_size}) must be >= num_classes ({num_classes})")
        self.num_classes = num_classes
        self.num_dn_queries = num_dn_queries
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.label_enc = nn.Embedding(label_book_size + int(unknown_label), embed_dim)
        self.inverse_sigmoid_eps = 1e-3

    def num_groups(self, max_gt: int) -> int:
        return max(1, self.num_dn_queries // max_gt) if max_gt > 0 else 1

    def _check_labels(self, targets: List[Dict[str, Tensor]]) -> None:
        """Labels outside the classes would index past ``label_enc`` (an IndexError, or a CUDA
        device-side assert) before the matcher's check runs; name the problem as the matcher does.
        Unlike the matcher's, this check is not synchronised across DDP workers: under
        ``do_train`` the mapper (``DetrDatasetMapper(num_classes=...)``) rejects such a record first."""
        from .matcher import label_range_message

        labels = [t["labels"].reshape(-1) for t in targets if len(t["labels"])]
        if not labels:
            return
        labels = torch.cat(labels)
        bad = (labels < 0) | (labels >= self.num_classes)
        if bool(bad.any()):
            found = sorted({int(v) for v in labels[bad].tolist()})
            raise ValueError(label_range_message(self.num_classes, f" (labels {found} here)"))

    def forward(self, targets: List[Dict[str, Tensor]], device=None) -> DenoisingQueries:
        if targets is None:
            raise ValueError("denoising needs the training targets")
        device = device if device is not None else self.label_enc.weight.device
        self._check_labels(targets)
        batch = len(targets)
        max_gt = max((len(t["labels"]) for t in targets), default=0)
        groups = self.num_groups(max_gt)
        blocks = 2 * groups  # positives and negatives of each group
        embed_dim = self.label_enc.embedding_dim
        labels = torch.zeros(batch, blocks, max_gt, dtype=torch.long, device=device)
        boxes = torch.zeros(batch, blocks, max_gt, 4, device=device)
        valid = torch.zeros(batch, blocks, max_gt, dtype=torch.bool, device=device)
        for b, t in enumerate(targets):
            n = len(t["labels"])
            labels[b, :, :n] = t["labels"].to(device)
            boxes[b, :, :n] = t["boxes"].to(device, torch.float32)
            valid[b, :, :n] = True

        if self.label_noise_ratio > 0:
            flip = (torch.rand(labels.shape, device=device) < self.label_noise_ratio * 0.5) & valid
            labels = torch.where(flip, torch.randint_like(labels, 0, self.num_classes), labels)
        if self.box_noise_scale > 0:
            corners = box_cxcywh_to_xyxy(boxes)
            half_wh = (boxes[..., 2:] / 2).repeat(1, 1, 1, 2)
            sign = torch.randint(0, 2, boxes.shape, device=device).float() * 2.0 - 1.0
            magnitude = torch.rand(boxes.shape, device=device)
            magnitude[:, 1::2] += 1.0  # negatives: between one and two half sizes away
            corners = (corners + sign * magnitude * half_wh * self.box_noise_scale).clamp(0.0, 1.0)
            boxes = box_xyxy_to_cxcywh(corners)

        tgt = self.label_enc(labels) * valid[..., None]
        box_logits = inverse_sigmoid(boxes, self.inverse_sigmoid_eps) * valid[..., None]
        return DenoisingQueries(
            tgt=tgt.reshape(batch, blocks * max_gt, embed_dim),
            reference_points=box_logits.sigmoid().reshape(batch, blocks * max_gt, 4),
            num_groups=groups,
            max_gt=max_gt,
        )

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, num_dn_queries={self.num_dn_queries}, "
                f"label_noise_ratio={self.label_noise_ratio}, box_noise_scale={self.box_noise_scale}, "
                f"inverse_sigmoid_eps={self.inverse_sigmoid_eps}")
