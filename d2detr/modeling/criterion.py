"""The set-prediction loss of DETR / Deformable DETR, returning weighted losses."""
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.utils import comm
from torch import Tensor, nn

from d2detr.layers.box_ops import box_cxcywh_to_xyxy, box_iou, generalized_box_iou

from .denoising import denoising_match_indices
from .hybrid_matching import repeat_targets
from .losses import sigmoid_focal_loss, varifocal_loss

__all__ = ["SetCriterion"]


class SetCriterion(nn.Module):
    """Hungarian-matched losses for DETR-style outputs.

    For every prediction set (final ``outputs``, each ``outputs["aux_outputs"][i]``,
    and ``outputs["enc_outputs"]``) the matcher assigns queries to targets and the
    requested ``losses`` are computed:

    - ``"class"`` (alias ``"labels"``) -> ``loss_class``: softmax cross-entropy over
      ``num_classes + 1`` logits with the no-object class weighted by ``eos_coef``
      (DETR), or with ``use_focal=True`` the sigmoid focal loss over ``num_classes``
      logits summed and divided by the number of boxes (Deformable DETR); with also
      ``class_loss="varifocal"`` the varifocal loss instead (VarifocalNet; RT-DETR's "VFL"):
      the matched query's target at its class is the (detached) IoU of its box with the target
      box rather than 1, so scores rank by localisation quality.
    - ``"boxes"`` -> ``loss_bbox`` (L1 on normalised cxcywh, or XYXY with
      ``l1_box_format="xyxy"`` as mmdet's AdaMixer / DEQDet) and ``loss_giou``, both summed
      over matched pairs and divided by the number of boxes.

    Keys get the suffix ``_{i}`` for aux output ``i`` and ``_enc`` for the encoder
    (two-stage) output. Denoising outputs (DINO: ``outputs["dn_outputs"]`` with its own
    ``aux_outputs``, and ``outputs["dn_meta"]``) are not matched: each positive denoising query is
    assigned the target it was made from (:func:`~d2detr.modeling.denoising.denoising_match_indices`),
    negatives and padding slots are background, and the losses are normalised by the number of
    boxes times the number of groups, with suffixes ``_dn`` and ``_dn_{i}``. Hybrid matching
    (H-DETR: ``outputs["one2many_outputs"]``, :mod:`d2detr.modeling.hybrid_matching`) is matched
    against the targets repeated ``one2many_repeat`` times, normalised by that many boxes, with
    suffixes ``_one2many`` and ``_one2many_{i}``. ``enc_one2many_repeat > 0`` also supervises every
    encoder token's proposal (``outputs["enc_dense_outputs"]``, DINO's transformer: not only the
    selected ones) against the encoder's targets repeated that many times, the same way (suffix
    ``_enc_one2many``): the dense one-to-many supervision of the first stage that DETA and Co-DETR
    give the encoder, here with H-DETR's repeated-target assignment. The returned dict holds **weighted** losses: the weight of
    ``loss_class_0`` is ``weight_dict["loss_class_0"]`` if given, else
    ``weight_dict["loss_class"]``; a loss with no weight is an error.

    The number of boxes is averaged over DDP workers and clamped to >= 1, so
    batches (or whole workers) without any object give finite losses.

    Subclasses add losses by overriding :meth:`get_loss` (and their names in ``losses``).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: Dict[str, float],
        losses: Sequence[str] = ("class", "boxes"),
        eos_coef: float = 0.1,
        use_focal: bool = False,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        enc_class_agnostic: bool = True,
        l1_box_format: str = "cxcywh",
        one2many_repeat: int = 0,
        class_loss: str = "focal",
        enc_one2many_repeat: int = 0,
        varifocal_alpha: float = 0.75,
    ):
        super().__init__()
        if class_loss not in ("focal", "varifocal"):
            raise ValueError(f"class_loss must be 'focal' or 'varifocal', got {class_loss!r}")
        if class_loss == "varifocal" and not use_focal:
            raise ValueError("class_loss='varifocal' needs sigmoid classification (use_focal=True)")
        self.class_loss = class_loss
        self.varifocal_alpha = varifocal_alpha
        if one2many_repeat < 0:
            raise ValueError(f"one2many_repeat must be >= 0, got {one2many_repeat}")
        self.one2many_repeat = one2many_repeat
        if enc_one2many_repeat < 0:
            raise ValueError(f"enc_one2many_repeat must be >= 0, got {enc_one2many_repeat}")
        self.enc_one2many_repeat = enc_one2many_repeat
        if l1_box_format not in ("cxcywh", "xyxy"):
            raise ValueError(f"l1_box_format must be 'cxcywh' or 'xyxy', got {l1_box_format!r}")
        self.l1_box_format = l1_box_format
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.losses = ["class" if l == "labels" else l for l in losses]
        self.eos_coef = eos_coef
        self.use_focal = use_focal
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.enc_class_agnostic = enc_class_agnostic
        if not use_focal:
            empty_weight = torch.ones(num_classes + 1)
            empty_weight[-1] = eos_coef
            self.register_buffer("empty_weight", empty_weight, persistent=False)

    # ----------------------------------------------------------------- losses
    @staticmethod
    def _src_permutation_idx(indices: List[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for (src, _) in indices])
        return batch_idx, src_idx

    def loss_class(self, outputs, targets, indices, num_boxes) -> Dict[str, Tensor]:
        logits = outputs["pred_logits"].float()
        B, Q, K = logits.shape
        idx = self._src_permutation_idx(indices)
        idx = (idx[0].to(logits.device), idx[1].to(logits.device))
        matched_labels = torch.cat(
            [t["labels"][J] for t, (_, J) in zip(targets, indices)]
        ).to(logits.device, torch.long)
        if self.use_focal:
            # one extra column absorbs the "no object" label, then is dropped
            target_classes = torch.full((B, Q), K, dtype=torch.long, device=logits.device)
            target_classes[idx] = matched_labels
            onehot = torch.zeros(B, Q, K + 1, dtype=logits.dtype, device=logits.device)
            onehot.scatter_(2, target_classes.unsqueeze(-1), 1)
            if self.class_loss == "varifocal":
                quality = onehot[..., :-1] * self._matched_ious(outputs, targets, indices, idx, B, Q)[..., None]
                loss = varifocal_loss(logits, quality, self.varifocal_alpha, self.focal_gamma, reduction="sum")
                return {"loss_class": loss / num_boxes}
            loss = sigmoid_focal_loss(
                logits, onehot[..., :-1], self.focal_alpha, self.focal_gamma, reduction="sum"
            )
            return {"loss_class": loss / num_boxes}
        if K != self.num_classes + 1:
            raise ValueError(
                f"softmax classification expects num_classes + 1 = {self.num_classes + 1} logits, got {K}"
            )
        target_classes = torch.full((B, Q), self.num_classes, dtype=torch.long, device=logits.device)
        target_classes[idx] = matched_labels
        loss = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)
        return {"loss_class": loss}

    def matched_pair_ious(self, outputs, targets, indices) -> Tensor:
        """``[P]`` detached IoU of each matched (query, target) pair, in the order of
        ``_src_permutation_idx(indices)``."""
        idx = self._src_permutation_idx(indices)
        pred = outputs["pred_boxes"].detach().float()
        src = box_cxcywh_to_xyxy(pred[idx[0].to(pred.device), idx[1].to(pred.device)])
        tgt = box_cxcywh_to_xyxy(torch.cat([t["boxes"][J] for t, (_, J) in zip(targets, indices)]).to(src))
        return torch.diag(box_iou(src, tgt)[0]) if len(src) else src.new_zeros(0)

    def _matched_ious(self, outputs, targets, indices, idx, B: int, Q: int) -> Tensor:
        """(B, Q) detached IoU of each matched query's box with its target, 0 for the unmatched."""
        ious = outputs["pred_boxes"].new_zeros(B, Q, dtype=torch.float32)
        ious[idx] = self.matched_pair_ious(outputs, targets, indices).to(ious.device)
        return ious

    def loss_boxes(self, outputs, targets, indices, num_boxes) -> Dict[str, Tensor]:
        pred = outputs["pred_boxes"]
        idx = self._src_permutation_idx(indices)
        src_boxes = pred[idx[0].to(pred.device), idx[1].to(pred.device)].float()
        tgt_boxes = torch.cat([t["boxes"][J] for t, (_, J) in zip(targets, indices)]).to(src_boxes)
        src_xyxy, tgt_xyxy = box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes)
        if self.l1_box_format == "xyxy":
            loss_bbox = F.l1_loss(src_xyxy, tgt_xyxy, reduction="none").sum() / num_boxes
        else:
            loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="none").sum() / num_boxes
        giou = generalized_box_iou(src_xyxy, tgt_xyxy)
        loss_giou = (1 - torch.diag(giou)).sum() / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def get_loss(self, loss: str, outputs, targets, indices, num_boxes) -> Dict[str, Tensor]:
        if loss == "class":
            return self.loss_class(outputs, targets, indices, num_boxes)
        if loss == "boxes":
            return self.loss_boxes(outputs, targets, indices, num_boxes)
        raise ValueError(f"unknown loss {loss!r}")

    # ----------------------------------------------------------------- driver
    def get_num_boxes(self, targets: List[Dict[str, Tensor]], device) -> Tensor:
        """Average number of target boxes per worker, >= 1 (a tensor: no host sync)."""
        num_boxes = torch.as_tensor(
            [float(sum(len(t["labels"]) for t in targets))], dtype=torch.float, device=device
        )
        world = comm.get_world_size()
        if world > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_boxes)
        return torch.clamp(num_boxes / world, min=1)[0]

    def weight_of(self, key: str, suffix: str) -> float:
        full = key + suffix
        if full in self.weight_dict:
            return self.weight_dict[full]
        if key in self.weight_dict:
            return self.weight_dict[key]
        raise KeyError(f"SetCriterion: no weight for {full!r} (nor {key!r}) in weight_dict {self.weight_dict}")

    def compute_set_losses(self, outputs, targets, num_boxes, suffix: str = "", indices=None) -> Dict[str, Tensor]:
        """Matches one prediction set (unless ``indices`` are given) and returns its weighted
        losses, keys suffixed."""
        if indices is None:
            indices = self.matcher(outputs, targets)
        out = {}
        for loss in self.losses:
            for k, v in self.get_loss(loss, outputs, targets, indices, num_boxes).items():
                out[k + suffix] = v * self.weight_of(k, suffix)
        return out

    def one2many_losses(self, outputs, targets, num_boxes, repeat: int, suffix: str) -> Dict[str, Tensor]:
        """One prediction set's weighted losses against ``targets`` repeated ``repeat`` times
        (normalised by that many boxes); the matcher costs each target once."""
        indices = self.matcher(outputs, targets, repeat=repeat)
        return self.compute_set_losses(outputs, repeat_targets(targets, repeat), num_boxes * repeat, suffix, indices)

    def forward(self, outputs: Dict, targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """``outputs``: ``pred_logits``, ``pred_boxes`` and optionally ``aux_outputs`` (list of
        dicts) and ``enc_outputs`` (dict); ``targets``: list of ``{"labels", "boxes"}``
        (boxes normalised cxcywh). Returns weighted scalar losses."""
        num_boxes = self.get_num_boxes(targets, outputs["pred_logits"].device)
        losses = self.compute_set_losses(outputs, targets, num_boxes)
        for i, aux in enumerate(outputs.get("aux_outputs") or []):
            losses.update(self.compute_set_losses(aux, targets, num_boxes, suffix=f"_{i}"))
        enc_targets = targets
        if self.enc_class_agnostic:
            enc_targets = [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]
        enc = outputs.get("enc_outputs")
        if enc is not None:
            losses.update(self.compute_set_losses(enc, enc_targets, num_boxes, suffix="_enc"))
        if self.enc_one2many_repeat:
            dense = outputs.get("enc_dense_outputs")
            if dense is None:
                raise ValueError("SetCriterion(enc_one2many_repeat > 0) needs every encoder token's proposal "
                                 "(outputs['enc_dense_outputs'], given in training by DINO's transformer)")
            losses.update(self.one2many_losses(dense, enc_targets, num_boxes, self.enc_one2many_repeat, "_enc_one2many"))
        dn = outputs.get("dn_outputs")
        if dn is not None:
            meta = outputs["dn_meta"]
            indices = denoising_match_indices(targets, meta)
            dn_num_boxes = num_boxes * meta["num_groups"]
            losses.update(self.compute_set_losses(dn, targets, dn_num_boxes, "_dn", indices))
            for i, aux in enumerate(dn.get("aux_outputs") or []):
                losses.update(self.compute_set_losses(aux, targets, dn_num_boxes, f"_dn_{i}", indices))
        one2many = outputs.get("one2many_outputs")
        if one2many is not None:
            if self.one2many_repeat < 1:
                raise ValueError("one-to-many outputs (hybrid matching) need SetCriterion(one2many_repeat >= 1)")
            losses.update(self.one2many_losses(one2many, targets, num_boxes, self.one2many_repeat, "_one2many"))
            for i, aux in enumerate(one2many.get("aux_outputs") or []):
                losses.update(self.one2many_losses(aux, targets, num_boxes, self.one2many_repeat, f"_one2many_{i}"))
        return losses

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, losses={self.losses}, use_focal={self.use_focal}, "
            f"eos_coef={self.eos_coef}, class_loss={self.class_loss}, focal_alpha={self.focal_alpha}, focal_gamma={self.focal_gamma}, "
            f"weight_dict={self.weight_dict}" + (f", one2many_repeat={self.one2many_repeat}" if self.one2many_repeat else "")
            + (f", enc_one2many_repeat={self.enc_one2many_repeat}" if self.enc_one2many_repeat else "")
        )
