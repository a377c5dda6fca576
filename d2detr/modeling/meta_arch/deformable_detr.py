"""The multi-scale detector every deformable method builds on: Deformable DETR (Zhu et al., ICLR
2021) and, through its hooks, DAB-Deformable-DETR, DINO and Focus-DETR.

Single-scale, multi-scale, + iterative bounding box refinement, + two-stage, following the
official implementation (fundamentalvision/Deformable-DETR, ``models/deformable_detr.py``), with
what its successors change exposed as arguments and hooks:

* ``share_decoder_heads``: one class / box head for every decoder layer (DINO's
  ``dec_pred_*_embed_share``) even with box refinement; Deformable DETR shares them only without
  refinement. With shared heads a two-stage model gets separate proposal heads on the
  transformer (``transformer.enc_out_class_embed`` / ``enc_out_bbox_embed``, DINO's layout); with
  per-layer heads they are the extra last entry of the lists (Deformable DETR's layout).
* ``inverse_sigmoid_eps``: the eps of every logit-space box update (1e-5 Deformable DETR, 1e-3 DINO).
* the decoder's ``look_forward_twice`` (whether a layer's loss reaches the previous layer's box
  head) and the transformer's :meth:`~d2detr.modeling.deformable_transformer.DeformableDetrTransformer.select_queries`.
* the transformer's ``num_one2many_queries`` (DINO's transformer): H-DETR's hybrid branch in
  training, its outputs to the criterion as ``one2many_outputs``
  (:mod:`d2detr.modeling.hybrid_matching`); inference and export never see it.
* ``denoising``: a module making extra query groups from the targets in training (DINO's
  contrastive denoising, :class:`~d2detr.modeling.denoising.ContrastiveDenoising`); their
  outputs go to the criterion as ``dn_outputs``; inference and export never see them.
* :meth:`init_queries` / :meth:`query_inputs`: the learned queries (Deformable DETR's
  ``query_embed``; DAB's content + anchor embeddings; none for two-stage).
"""
import copy
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from detectron2.structures import ImageList
from torch import Tensor, nn

from d2detr.layers.box_ops import inverse_sigmoid
from d2detr.layers.mlp import MLP

from .detr_base import DETRBase, aux_outputs_list, init_focal_heads

__all__ = ["DeformableDETR", "connect_unused"]


def connect_unused(x: Tensor, parameters: Sequence[nn.Parameter]) -> Tensor:
    """``x + 0 * sum(p)``: puts parameters that a training step does not use (heads without a loss,
    a label embedding when a batch has no objects) into the graph with zero gradients, so that
    DistributedDataParallel (``find_unused_parameters=False``) still reduces a gradient for every
    parameter on every worker. The official DINO does the same for its label embedding."""
    if not parameters:
        return x
    return x + 0.0 * sum(p.reshape(-1)[0] for p in parameters)


class DeformableDETR(DETRBase):
    """
    Args:
        backbone: a Detectron2 ``Backbone`` (ResNet-50 res3-res5 in the paper).
        neck: :class:`~d2detr.modeling.neck.ChannelMapper` producing
            ``transformer.num_feature_levels`` maps of ``embed_dim`` channels.
        position_embedding: ``PositionEmbeddingSine(normalize=True, offset=-0.5)``, applied
            to every level's padding mask.
        transformer: a :class:`~d2detr.modeling.deformable_transformer.DeformableDetrTransformer`;
            its ``two_stage`` flag makes this a two-stage model.
        criterion: ``SetCriterion`` with focal classification (None for inference only).
        num_classes: object classes (sigmoid, no "no-object" logit).
        num_queries: decoder queries (300); two-stage takes this many proposals.
        embed_dim: transformer width (256).
        aux_loss: supervise every decoder layer.
        with_box_refine: every decoder layer refines the previous layer's boxes. Two-stage
            requires it (as in the official code).
        share_decoder_heads: one head for all decoder layers; default ``not with_box_refine``
            (Deformable DETR: per-layer deep copies with refinement).
        inverse_sigmoid_eps: eps of the logit-space box updates (decoder and outputs).
        denoising: extra training-only query groups made from the targets (DINO), or None.
        select_box_nums_for_evaluation: detections per image at inference (top-k over
            queries x classes).
        others: see :class:`~d2detr.modeling.meta_arch.detr_base.DETRBase`.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: nn.Module,
        position_embedding: nn.Module,
        transformer: nn.Module,
        criterion: nn.Module = None,
        num_classes: int = 80,
        num_queries: int = 300,
        embed_dim: int = 256,
        aux_loss: bool = True,
        with_box_refine: bool = False,
        share_decoder_heads: Optional[bool] = None,
        inverse_sigmoid_eps: float = 1e-5,
        denoising: Optional[nn.Module] = None,
        select_box_nums_for_evaluation: int = 100,
        pixel_mean=(123.675, 116.280, 103.530),
        pixel_std=(58.395, 57.120, 57.375),
        size_divisibility: int = 0,
        input_format: str = "RGB",
        test_nms_thresh: Optional[float] = None,
        test_topk_candidates: Optional[int] = None,
    ):
        super().__init__(
            backbone=backbone,
            criterion=criterion,
            num_classes=num_classes,
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
            select_box_nums_for_evaluation=select_box_nums_for_evaluation,
            use_focal=True,
            size_divisibility=size_divisibility,
            input_format=input_format,
            test_nms_thresh=test_nms_thresh,
            test_topk_candidates=test_topk_candidates,
        )
        two_stage = transformer.two_stage
        if two_stage and not with_box_refine:
            raise ValueError("two-stage needs with_box_refine=True (as the official Deformable DETR)")
        num_levels = getattr(neck, "num_outs", transformer.num_feature_levels)
        if num_levels != transformer.num_feature_levels:
            raise ValueError(
                f"the neck gives {num_levels} feature levels, the transformer expects {transformer.num_feature_levels}"
            )
        if two_stage and transformer.two_stage_num_proposals != num_queries:
            raise ValueError(
                f"two-stage: transformer.two_stage_num_proposals ({transformer.two_stage_num_proposals}) "
                f"must equal num_queries ({num_queries})"
            )
        if transformer.num_one2many_queries and criterion is not None and getattr(criterion, "one2many_repeat", 0) < 1:
            raise ValueError(
                f"transformer.num_one2many_queries={transformer.num_one2many_queries} (hybrid matching) needs "
                "criterion.one2many_repeat >= 1: how many times the one-to-many targets repeat each object (H-DETR: 6)"
            )
        if denoising is not None and not transformer.decoder.derives_query_pos:
            raise ValueError("denoising queries need a decoder that derives positions from anchors (AnchorDeformableDecoder)")
        if share_decoder_heads is None:
            share_decoder_heads = not with_box_refine
        self.neck = neck
        self.position_embedding = position_embedding
        self.transformer = transformer
        self.num_queries = num_queries
        self.embed_dim = embed_dim
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.share_decoder_heads = share_decoder_heads
        self.two_stage = two_stage
        self.inverse_sigmoid_eps = inverse_sigmoid_eps
        transformer.decoder.inverse_sigmoid_eps = inverse_sigmoid_eps

        self.init_queries()

        class_embed = nn.Linear(embed_dim, num_classes)
        bbox_embed = MLP(embed_dim, embed_dim, 4, 3)
        init_focal_heads(class_embed, bbox_embed, prior_prob=0.01)

        num_layers = transformer.decoder.num_layers
        if share_decoder_heads:
            if not two_stage:
                nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList([class_embed for _ in range(num_layers)])
            self.bbox_embed = nn.ModuleList([bbox_embed for _ in range(num_layers)])
            if two_stage:  # proposal heads of their own (DINO's two_stage_*_embed_share=False)
                transformer.enc_out_class_embed = copy.deepcopy(class_embed)
                transformer.enc_out_bbox_embed = copy.deepcopy(bbox_embed)
        else:
            # per-layer deep copies; the two-stage proposal heads are the extra last ones
            num_pred = num_layers + (1 if two_stage else 0)
            self.class_embed = nn.ModuleList([copy.deepcopy(class_embed) for _ in range(num_pred)])
            self.bbox_embed = nn.ModuleList([copy.deepcopy(bbox_embed) for _ in range(num_pred)])
            if not two_stage:
                nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
        transformer.decoder.bbox_embed = self.bbox_embed if with_box_refine else None
        if two_stage:
            transformer.decoder.class_embed = self.class_embed

        self.denoising = denoising
        if denoising is not None:
            denoising.inverse_sigmoid_eps = inverse_sigmoid_eps
        # DETRBase passes the targets to forward_features when a module needs them in training
        self.forward_features_needs_targets = denoising is not None
        self._unused_without_aux = self._heads_without_gradient()

    def _heads_without_gradient(self) -> List[nn.Parameter]:
        """Parameters no loss reaches when ``aux_loss`` is False: the intermediate layers' own
        heads (a refinement step's box head output is detached before the next layer)."""
        if self.aux_loss or self.share_decoder_heads:
            return []
        layers = range(self.transformer.decoder.num_layers - 1)
        return [p for i in layers for head in (self.class_embed[i], self.bbox_embed[i]) for p in head.parameters()]

    # ---------------------------------------------------------------- queries
    def init_queries(self) -> None:
        """Learned single-stage queries: ``query_embed [Q, 2C]`` (position, then content)."""
        if not self.two_stage:
            self.query_embed = nn.Embedding(self.num_queries, self.embed_dim * 2)

    def query_inputs(self):
        """What :meth:`init_queries` made, in the form the transformer's ``query_embed`` takes."""
        return None if self.two_stage else self.query_embed.weight

    # --------------------------------------------------------------- features
    def multi_scale_features(
        self, images: Union[ImageList, Tensor], masks: Tensor
    ) -> Tuple[List[Tensor], List[Tensor], List[Optional[Tensor]]]:
        """Backbone -> neck -> ``(srcs, level_masks, pos_embeds)``, one of each per level; the
        transformer's decoder-only levels get no position embedding (None: their tokens are only
        values, and at stride 4 the embedding would be the dearest part of the level)."""
        x = images.tensor if isinstance(images, ImageList) else images
        srcs = self.neck(self.backbone(x))
        decoder_only = getattr(self.transformer, "num_decoder_only_levels", 0)
        level_masks: List[Tensor] = []
        pos_embeds: List[Optional[Tensor]] = []
        for lvl, src in enumerate(srcs):
            mask, pos = self.mask_and_position(src, masks, with_position=lvl >= decoder_only)
            level_masks.append(mask)
            pos_embeds.append(pos)
        return srcs, level_masks, pos_embeds

    def reference_is_box(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` starts from (cx, cy, w, h) references rather than (x, y)
        points (a static fact of the configuration, so traced graphs need no shape test)."""
        first = self.two_stage or self.transformer.decoder.derives_query_pos
        return first or (layer > 0 and self.with_box_refine)

    def predict_per_layer(self, hs: Tensor, init_reference: Tensor, inter_references: Tensor
                          ) -> Tuple[List[Tensor], List[Tensor]]:
        """Every decoder layer's class logits and boxes ``sigmoid(bbox_embed(hs) + logit(reference))``,
        the reference being what the layer started from (2-d references predict w, h freely)."""
        outputs_classes, outputs_coords = [], []
        for lvl in range(hs.shape[0]):
            reference = init_reference if lvl == 0 else inter_references[lvl - 1]
            reference = inverse_sigmoid(reference, self.inverse_sigmoid_eps)
            delta = self.bbox_embed[lvl](hs[lvl])
            if self.reference_is_box(lvl):
                delta = delta + reference
            else:
                delta = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            outputs_classes.append(self.class_embed[lvl](hs[lvl]))
            outputs_coords.append(delta.sigmoid())
        return outputs_classes, outputs_coords

    def forward_features(self, images: ImageList, masks: Tensor, targets: Optional[List[Dict]] = None) -> Dict:
        srcs, level_masks, pos_embeds = self.multi_scale_features(images, masks)
        dn = None
        if self.training and self.denoising is not None:
            dn = self.denoising(targets, device=srcs[0].device)
        hs, init_reference, inter_references, enc_logits, enc_coords_unact, *encoder_outputs = self.transformer(
            srcs, level_masks, pos_embeds, self.query_inputs(), denoising_queries=dn
        )
        outputs_classes, outputs_coords = self.predict_per_layer(hs, init_reference, inter_references)
        dn_outputs = None
        if dn is not None:
            p = dn.num_queries
            dn_classes = [c[:, :p] for c in outputs_classes]
            dn_coords = [b[:, :p] for b in outputs_coords]
            outputs_classes = [c[:, p:] for c in outputs_classes]
            outputs_coords = [b[:, p:] for b in outputs_coords]
            init_reference, inter_references = init_reference[:, p:], inter_references[:, :, p:]
            dn_outputs = {"pred_logits": dn_classes[-1], "pred_boxes": dn_coords[-1],
                          "aux_outputs": aux_outputs_list(dn_classes, dn_coords) if self.aux_loss else []}
        one2many_outputs = None
        if self.training and self.transformer.num_one2many_queries:
            # H-DETR's hybrid branch: the one-to-one queries come first, then the one-to-many ones
            q = min(self.num_queries, outputs_classes[0].shape[1])
            o2m_classes = [c[:, q:] for c in outputs_classes]
            o2m_coords = [b[:, q:] for b in outputs_coords]
            outputs_classes = [c[:, :q] for c in outputs_classes]
            outputs_coords = [b[:, :q] for b in outputs_coords]
            init_reference, inter_references = init_reference[:, :q], inter_references[:, :, :q]
            one2many_outputs = {"pred_logits": o2m_classes[-1], "pred_boxes": o2m_coords[-1],
                                "aux_outputs": aux_outputs_list(o2m_classes, o2m_coords) if self.aux_loss else []}
        out = {"pred_logits": outputs_classes[-1], "pred_boxes": outputs_coords[-1]}
        if self.reference_is_box(0):  # the reference box each layer started from
            out["anchors"] = torch.cat([init_reference[None], inter_references[:-1]])
        if self.training:
            out["pred_logits"] = connect_unused(out["pred_logits"], self._unused_without_aux)
            if self.denoising is not None:
                out["pred_logits"] = connect_unused(out["pred_logits"], list(self.denoising.parameters()))
            if self.aux_loss:
                out["aux_outputs"] = aux_outputs_list(outputs_classes, outputs_coords)
            if self.two_stage:
                out["enc_outputs"] = {"pred_logits": enc_logits, "pred_boxes": enc_coords_unact.sigmoid()}
            if dn_outputs is not None:
                out["dn_outputs"] = dn_outputs
                out["dn_meta"] = dn.meta
            if one2many_outputs is not None:
                out["one2many_outputs"] = one2many_outputs
        for extra in encoder_outputs:  # what the encoder reports besides the memory (Focus-DETR)
            out.update(extra)
        return out
