"""SD-DETR's transformer: DETR's encoder, the mini-detector, task-aware queries and the
spatially decoupled conditional decoder.

The decoder is built from :class:`~d2detr.modeling.conditional_transformer.ConditionalDecoderLayer`
halves. ``decoupling`` selects the rows of the paper's Tables 2 and 3:

* ``"none"`` -- Conditional DETR's layer; the class and box heads read the same feature
  (the "Conditional DETR + mini-detector" baseline);
* ``"cross_attention"`` -- decoupled feature learning (DFL): one self-attention over the
  concatenated classification and localisation queries ``[q_cls; q_loc]`` (``2Q`` queries),
  split again, then per branch its own conditional cross-attention, FFN, norms, ``query_scale``
  and final norm;
* ``"full"`` -- Table 3's alternative: two complete decoder copies (own self-attention too).

Per branch ``b``, the queries are built from the mini-detector's anchor boxes
``A = (cx, cy, w, h)``: the reference point ``s_b`` (the centre of ``A``, or with
``task_aware_queries`` the mean of the branch's discriminative points), the positional query
``query_pos_head(PE(s_b, w, h))`` (DAB-DETR's MLP of the 4-D sine embedding), the conditional
spatial query ``PE(s_b) * query_scale_b(f)`` (the identity in the first layer) and the content
query (zeros as Conditional DETR, or the mean feature at the discriminative points). Reference
points and anchors stay fixed through the decoder, as Conditional DETR's.
"""
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from d2detr.layers import MLP
from d2detr.modeling.conditional_transformer import ConditionalDecoderLayer, gen_sineembed_for_position
from d2detr.modeling.transformer import TransformerEncoder, TransformerEncoderLayer, flatten_single_scale, xavier_init_

from .query_generation import DiscriminativePoints, MiniDetector, anchors_to_feature_boxes, roi_align

__all__ = ["DECOUPLING_MODES", "SDDecoderLayer", "SDDetrDecoder", "SDDetrTransformer"]

#: ``decoupling`` values: the baseline, decoupled feature learning, Table 3's full decoder copy.
DECOUPLING_MODES = ("none", "cross_attention", "full")


def branch_names(decoupling: str) -> Tuple[str, ...]:
    """The decoder's branches: ``("shared",)`` when nothing is decoupled, else ``("cls", "loc")``."""
    if decoupling not in DECOUPLING_MODES:
        raise ValueError(f"decoupling must be one of {DECOUPLING_MODES}, got {decoupling!r}")
    return ("shared",) if decoupling == "none" else ("cls", "loc")


class SDDecoderLayer(nn.Module):
    """One decoder layer; its parts are ConditionalDecoderLayer halves in ``parts``:

    * ``"none"``: ``parts.shared`` (a whole layer);
    * ``"cross_attention"``: ``parts.shared`` (self-attention only, over ``[q_cls; q_loc]``),
      ``parts.cls`` / ``parts.loc`` (cross-attention + FFN only);
    * ``"full"``: ``parts.cls`` / ``parts.loc`` (whole layers, nothing shared).

    ``forward(tgt_cls, tgt_loc, pos_cls, pos_loc, sine_cls, sine_loc, memory, pos, mask, is_first)``
    -> ``(tgt_cls, tgt_loc)``; with ``"none"`` the ``*_loc`` inputs are ignored and the one output
    is returned twice.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, activation: str,
                 decoupling: str = "cross_attention"):
        super().__init__()
        branch_names(decoupling)
        self.decoupling = decoupling

        def half(sa: bool, ca: bool) -> ConditionalDecoderLayer:
            return ConditionalDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                                           with_self_attention=sa, with_cross_attention=ca)

        if decoupling == "none":
            self.parts = nn.ModuleDict({"shared": half(True, True)})
        elif decoupling == "cross_attention":
            self.parts = nn.ModuleDict({"shared": half(True, False), "cls": half(False, True), "loc": half(False, True)})
        else:
            self.parts = nn.ModuleDict({"cls": half(True, True), "loc": half(True, True)})

    def forward(self, tgt_cls: Tensor, tgt_loc: Tensor, pos_cls: Tensor, pos_loc: Tensor, sine_cls: Tensor,
                sine_loc: Tensor, memory: Tensor, pos: Tensor, mask: Optional[Tensor], is_first: bool):
        if self.decoupling == "none":
            out = self.parts["shared"](tgt_cls, memory, pos, pos_cls, sine_cls, mask, is_first)
            return out, out
        if self.decoupling == "cross_attention":
            q = tgt_cls.shape[1]
            joint = self.parts["shared"].forward_self_attention(
                torch.cat([tgt_cls, tgt_loc], 1), torch.cat([pos_cls, pos_loc], 1)
            )
            tgt_cls, tgt_loc = joint[:, :q], joint[:, q:]
        else:
            tgt_cls = self.parts["cls"].forward_self_attention(tgt_cls, pos_cls)
            tgt_loc = self.parts["loc"].forward_self_attention(tgt_loc, pos_loc)
        tgt_cls = self.parts["cls"].forward_cross_attention(tgt_cls, memory, pos, pos_cls, sine_cls, mask, is_first)
        tgt_loc = self.parts["loc"].forward_cross_attention(tgt_loc, memory, pos, pos_loc, sine_loc, mask, is_first)
        return tgt_cls, tgt_loc


class SDDetrDecoder(nn.Module):
    """``num_layers`` :class:`SDDecoderLayer` with one ``query_scale`` (Conditional DETR's λ_q
    MLP) and one output ``norm`` per branch (``ModuleDict`` keyed ``shared`` or ``cls``/``loc``).

    ``forward(tgt_cls, tgt_loc, pos_cls, pos_loc, ref_cls, ref_loc, memory, pos, mask)`` ->
    ``(hs_cls [L,B,Q,C], hs_loc [L,B,Q,C])`` (normalised; the same tensor twice with ``"none"``).
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_layers: int = 6, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation: str = "relu", decoupling: str = "cross_attention"):
        super().__init__()
        self.branches = branch_names(decoupling)
        self.decoupling = decoupling
        self.layers = nn.ModuleList(
            SDDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation, decoupling) for _ in range(num_layers)
        )
        # as Conditional DETR: the content query joins the spatial one only in the first layer
        for layer in self.layers[1:]:
            for part in layer.parts.values():
                if part.with_cross_attention:
                    part.ca_qpos_proj = None
        self.query_scale = nn.ModuleDict({b: MLP(d_model, d_model, d_model, 2) for b in self.branches})
        self.norm = nn.ModuleDict({b: nn.LayerNorm(d_model) for b in self.branches})
        self.num_layers = num_layers
        self.d_model = d_model

    def forward(self, tgt_cls: Tensor, tgt_loc: Tensor, pos_cls: Tensor, pos_loc: Tensor, ref_cls: Tensor,
                ref_loc: Tensor, memory: Tensor, pos: Tensor, mask: Optional[Tensor] = None):
        cls_name, loc_name = (self.branches * 2)[:2]
        sine_cls = gen_sineembed_for_position(ref_cls, self.d_model // 2)
        sine_loc = sine_cls if ref_loc is ref_cls else gen_sineembed_for_position(ref_loc, self.d_model // 2)
        out_cls, out_loc = tgt_cls, tgt_loc
        hs_cls: List[Tensor] = []
        hs_loc: List[Tensor] = []
        for i, layer in enumerate(self.layers):
            s_cls = sine_cls if i == 0 else sine_cls * self.query_scale[cls_name](out_cls)
            s_loc = sine_loc if i == 0 or self.decoupling == "none" else sine_loc * self.query_scale[loc_name](out_loc)
            out_cls, out_loc = layer(out_cls, out_loc, pos_cls, pos_loc, s_cls, s_loc, memory, pos, mask, i == 0)
            hs_cls.append(self.norm[cls_name](out_cls))
            if self.decoupling != "none":
                hs_loc.append(self.norm[loc_name](out_loc))
        stacked_cls = torch.stack(hs_cls)
        return stacked_cls, (stacked_cls if self.decoupling == "none" else torch.stack(hs_loc))


class SDDetrTransformer(nn.Module):
    """DETR's post-norm encoder, the mini-detector, (task-aware) query generation and the
    :class:`SDDetrDecoder`.

    Args:
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout, activation:
            as Conditional DETR (256, 8, 6, 6, 2048, 0.1, relu).
        decoupling: ``"none"`` | ``"cross_attention"`` | ``"full"`` (see the module docstring).
        task_aware_queries: initialise each branch's content and reference point from its own
            discriminative points in the anchor's RoI; needs a decoupled decoder.
        num_points: discriminative points per branch and anchor (8: SAM-DETR's one per head).
        roi_size: RoIAlign output size (7, SAM-DETR's).
        anchor_scale: the mini-detector's initial proposal size.

    ``forward(src [B,C,H,W], mask [B,H,W] (True = padding), pos_embed [B,C,H,W], num_queries)``
    returns a dict: ``hs_cls``/``hs_loc`` ``[L,B,Q,C]``, ``anchors [B,Q,4]``, ``cls_reference``/
    ``loc_reference [B,Q,2]``, the mini-detector's ``enc_logits [B,HW,1]`` / ``enc_boxes [B,HW,4]``,
    ``memory [B,C,H,W]`` and, with task-aware queries, ``cls_points``/``loc_points [B,Q,P,2]``
    (normalised image coordinates). ``Q = min(num_queries, H*W)``.
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        decoupling: str = "cross_attention",
        task_aware_queries: bool = True,
        num_points: int = 8,
        roi_size: int = 7,
        anchor_scale: float = 0.2,
    ):
        super().__init__()
        branches = branch_names(decoupling)
        if task_aware_queries and decoupling == "none":
            raise ValueError("task_aware_queries builds one query per task branch: it needs decoupling="
                             "'cross_attention' or 'full', not 'none'")
        self.encoder = TransformerEncoder(
            TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation, False), num_encoder_layers
        )
        self.mini_detector = MiniDetector(d_model, anchor_scale)
        self.query_pos_head = MLP(2 * d_model, d_model, d_model, 2)
        self.point_heads = (
            nn.ModuleDict({b: DiscriminativePoints(d_model, num_points, roi_size) for b in branches})
            if task_aware_queries else None
        )
        self.decoder = SDDetrDecoder(d_model, nhead, num_decoder_layers, dim_feedforward, dropout, activation,
                                     decoupling)
        self.d_model = d_model
        self.nhead = nhead
        self.decoupling = decoupling
        self.task_aware_queries = task_aware_queries
        self.roi_size = roi_size
        self._reset_parameters()

    def _reset_parameters(self):
        # Xavier on every matrix (Conditional DETR's and SAM-DETR's transformer reset; in SAM-DETR
        # it also redraws the point predictor's last layer), then the mini-detector's focal heads
        xavier_init_(self)
        self.mini_detector.reset_heads()

    def branch_queries(self, memory_2d: Tensor, feat_mask: Tensor, anchors: Tensor) -> Dict[str, Tensor]:
        """Per branch: ``{b}_content [B,Q,C]``, ``{b}_reference [B,Q,2]`` and, task-aware,
        ``{b}_points [B,Q,P,2]`` (normalised image coordinates)."""
        centre, half_wh = anchors[..., :2], 0.5 * anchors[..., 2:]
        if self.point_heads is None:
            content = anchors.new_zeros(*anchors.shape[:2], self.d_model)
            return {"cls_content": content, "loc_content": content, "cls_reference": centre, "loc_reference": centre}
        roi = roi_align(memory_2d, anchors_to_feature_boxes(anchors, feat_mask), self.roi_size)
        out = {}
        for b, head in self.point_heads.items():
            content, offsets = head(roi)
            out[f"{b}_content"] = content
            out[f"{b}_points"] = centre[:, :, None] + half_wh[:, :, None] * offsets
            out[f"{b}_reference"] = centre + half_wh * offsets.mean(2)
        return out

    def forward(self, src: Tensor, mask: Tensor, pos_embed: Tensor, num_queries: int) -> Dict[str, Tensor]:
        bs, c, h, w = src.shape
        feat_mask = mask
        src, pos, mask = flatten_single_scale(src, mask, pos_embed)
        memory = self.encoder(src, pos=pos, key_padding_mask=mask)
        anchors, enc_logits, enc_boxes = self.mini_detector(memory, mask, (h, w), num_queries)
        memory_2d = memory.transpose(1, 2).reshape(bs, c, h, w)
        q = self.branch_queries(memory_2d, feat_mask, anchors)
        wh = anchors[..., 2:]
        pos_cls = self.query_pos_head(gen_sineembed_for_position(torch.cat([q["cls_reference"], wh], -1), c // 2))
        pos_loc = pos_cls
        if q["loc_reference"] is not q["cls_reference"]:
            pos_loc = self.query_pos_head(gen_sineembed_for_position(torch.cat([q["loc_reference"], wh], -1), c // 2))
        hs_cls, hs_loc = self.decoder(q["cls_content"], q["loc_content"], pos_cls, pos_loc,
                                      q["cls_reference"], q["loc_reference"], memory, pos, mask)
        out = {"hs_cls": hs_cls, "hs_loc": hs_loc, "anchors": anchors, "enc_logits": enc_logits,
               "enc_boxes": enc_boxes, "memory": memory_2d}
        out.update({k: v for k, v in q.items() if not k.endswith("_content")})
        return out
