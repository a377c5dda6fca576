"""Focus-DETR's sparse encoder on DINO's transformer.

Following the PyTorch release (huawei-noah/noah-research ``Focus-DETR``:
``FOCUS_DETRTransformer``, ``FOCUS_DETRTransformerEncoder``, ``Focus_DETR_BaseTransformerLayer``
with ``operation_order=("OESM", "encoder_cross_attn", "norm", "ffn", "norm")``):

* the foreground token selector (:mod:`.foreground`) scores every token; padding gets the smallest
  score of the batch;
* each image keeps ``int(rho * valid tokens) + 1`` tokens (``rho = 0.5``); the batch keeps
  ``K`` = the largest of these, and encoder layer ``i`` takes the top ``int(cascade[i] * K)``
  tokens by foreground score (cascade ``1.0, 0.8, 0.6, 0.6, 0.4, 0.2``);
* only those tokens are gathered, updated and scattered back -- the rest of the memory is not
  computed at all; an image writes back at most its own number of kept tokens;
* in a layer, the dual attention first: the top 300 kept tokens by (largest class logit of the
  two-stage proposal class head) x (foreground logit) go through multi-head self-attention
  (positions added to queries and keys), residual and a LayerNorm, and are scattered back among
  the kept tokens; then multi-scale deformable attention from the kept tokens into the *neck
  features* (the encoder's input, the same in every layer), residual, LayerNorm, FFN, LayerNorm.

Every top-k takes ``min(k, available tokens)`` (small or heavily padded images, where the release
fails on its fixed top-300), and every count is computed from the padding mask at run time, also
in traced and exported graphs.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from d2detr.layers.dynamic_shapes import count_from_tensor, num_selected
from d2detr.modeling.deformable_transformer import (
    DeformableTransformerEncoder,
    DeformableTransformerEncoderLayer,
    gather_tokens,
    gen_encoder_output_proposals,
)
from d2detr.modeling.dino_transformer import DinoTransformer
from d2detr.modeling.transformer import with_pos_embed

from .foreground import ForegroundTokenSelector

__all__ = ["FocusEncoderLayer", "FocusEncoder", "FocusDetrTransformer", "OFFICIAL_CASCADE_RATIOS"]

#: The share of the kept tokens each of the six encoder layers updates (PyTorch release).
OFFICIAL_CASCADE_RATIOS = (1.0, 0.8, 0.6, 0.6, 0.4, 0.2)


class FocusEncoderLayer(DeformableTransformerEncoderLayer):
    """One sparse encoder layer: dual attention over the finest-grained kept tokens, then
    :class:`~d2detr.modeling.deformable_transformer.DeformableTransformerEncoderLayer`'s deformable
    attention (``self_attn``, here from the kept tokens into the neck features), ``norm1``, FFN
    (``linear1``/``linear2``), ``norm2``.

    Args: those of the base layer, and
        num_dual_tokens: how many tokens the dual attention re-attends (300); fewer when fewer are kept.

    ``dual_attn`` (``nn.MultiheadAttention``, dropout = ``dropout``) and ``dual_norm`` are the
    dual attention (the release's ``attentions.0`` and ``norm2``).
    """

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4,
                 ffn_dim: int = 1024, dropout: float = 0.1, activation: str = "relu",
                 compute_in_float32: Optional[bool] = None, num_dual_tokens: int = 300):
        super().__init__(embed_dim, num_heads, num_levels, num_points, ffn_dim, dropout, activation,
                         compute_in_float32)
        if num_dual_tokens < 1:
            raise ValueError(f"num_dual_tokens must be positive, got {num_dual_tokens}")
        self.num_dual_tokens = num_dual_tokens
        self.dual_attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)
        self.dual_dropout = nn.Dropout(dropout)
        self.dual_norm = nn.LayerNorm(embed_dim)

    def dual_attention(self, query: Tensor, query_pos: Tensor, foreground_scores: Tensor,
                       class_head: nn.Module) -> Tuple[Tensor, Tensor]:
        """``query``/``query_pos`` ``[N, K, C]``, ``foreground_scores [N, K]`` (logits) -> the
        queries with their top tokens re-attended, and those tokens' positions ``[N, k]`` in ``query``."""
        # the release multiplies the raw logits (not probabilities), as here
        score = class_head(query).max(-1)[0] * foreground_scores
        k = num_selected(self.num_dual_tokens, score, 1)
        index = torch.topk(score, k, dim=1)[1]
        tokens, pos = gather_tokens(query, index), gather_tokens(query_pos, index)
        q = with_pos_embed(tokens, pos)
        attended = self.dual_attn(q, q, tokens, need_weights=False)[0]
        tokens = self.dual_norm(tokens + self.dual_dropout(attended))
        return query.scatter(1, index.unsqueeze(-1).expand_as(tokens), tokens), index

    def forward(self, query: Tensor, query_pos: Tensor, reference_points: Tensor, value: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor, value_padding_mask: Optional[Tensor],
                foreground_scores: Tensor, class_head: nn.Module) -> Tensor:
        """``query``/``query_pos`` ``[N, K, C]`` (the kept tokens), ``reference_points [N, K, L, 2]``,
        ``value [N, S, C]`` (all tokens), ``value_padding_mask [N, S]``, ``foreground_scores [N, K]``,
        ``class_head``: the two-stage proposal class head -> ``[N, K, C]``."""
        query, _ = self.dual_attention(query, query_pos, foreground_scores, class_head)
        update = self.self_attn(with_pos_embed(query, query_pos), reference_points, value, spatial_shapes,
                                level_start_index, value_padding_mask)
        query = self.norm1(query + self.dropout1(update))
        return self.forward_ffn(query)


class FocusEncoder(DeformableTransformerEncoder):
    """The cascade of sparse layers (see the module docstring).

    Args:
        encoder_layer: a :class:`FocusEncoderLayer`, copied ``num_layers`` times.
        num_layers: 6.
        keep_ratio: rho, the share of an image's valid tokens kept (0.5).
        cascade_ratios: per layer, the share of the kept tokens it updates (one per layer;
            :data:`OFFICIAL_CASCADE_RATIOS` for six layers).
    """

    def __init__(self, encoder_layer: nn.Module, num_layers: int, keep_ratio: float = 0.5,
                 cascade_ratios: Sequence[float] = OFFICIAL_CASCADE_RATIOS):
        super().__init__(encoder_layer, num_layers)
        if not isinstance(encoder_layer, FocusEncoderLayer):
            raise TypeError(f"FocusEncoder needs FocusEncoderLayer layers, got {type(encoder_layer).__name__}")
        cascade_ratios = tuple(float(r) for r in cascade_ratios)
        if len(cascade_ratios) != num_layers:
            raise ValueError(f"cascade_ratios needs one ratio per encoder layer ({num_layers}), got {cascade_ratios}")
        if not all(0 < r <= 1 for r in cascade_ratios):
            raise ValueError(f"cascade ratios must lie in (0, 1], got {cascade_ratios}")
        if not 0 < keep_ratio <= 1:
            raise ValueError(f"keep_ratio must lie in (0, 1], got {keep_ratio}")
        self.keep_ratio = keep_ratio
        self.cascade_ratios = cascade_ratios
        # float32, as the release multiplies them (a buffer: it follows the model's device)
        self.register_buffer("cascade", torch.tensor(cascade_ratios, dtype=torch.float32), persistent=False)

    def kept_counts(self, padding_mask: Tensor) -> Tuple[Tensor, Tensor]:
        """``padding_mask [N, S]`` -> ``(per-image kept tokens [N], per-layer counts [num_layers])``
        as int64 tensors: ``int(rho * valid) + 1`` per image, and ``int(cascade[i] * max)`` (at
        least 1) per layer, in float32 as the release computes them."""
        valid = (~padding_mask).sum(1)
        per_image = ((valid * self.keep_ratio).to(torch.int64) + 1).clamp(max=padding_mask.shape[1])
        per_layer = (self.cascade * per_image.max().to(torch.float32)).to(torch.int64).clamp(min=1)
        return per_image, per_layer

    def forward(self, src: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, valid_ratios: Tensor,
                pos: Optional[Tensor] = None, padding_mask: Optional[Tensor] = None,
                spatial_shapes_list: Optional[List[Tuple[int, int]]] = None,
                foreground_scores: Optional[Tensor] = None, class_head: Optional[nn.Module] = None):
        """As :class:`DeformableTransformerEncoder`, plus ``foreground_scores [N, S]`` (padding
        already lowest) and the proposal ``class_head``. Returns ``(memory [N, S, C], kept index
        per layer (list of ``[N, k_i]``, best first), kept tokens per image [N])``."""
        if foreground_scores is None or class_head is None:
            raise ValueError("FocusEncoder needs the foreground scores and the proposal class head")
        if spatial_shapes_list is None:
            spatial_shapes_list = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        N, S, C = src.shape
        if padding_mask is None:
            padding_mask = torch.zeros(N, S, dtype=torch.bool, device=src.device)
        if pos is None:
            pos = torch.zeros_like(src)
        reference_points = self.get_reference_points(spatial_shapes_list, valid_ratios)
        L = reference_points.shape[2]
        reference_points = reference_points.flatten(2)  # [N, S, L * 2]: gathered with the tokens
        per_image, per_layer = self.kept_counts(padding_mask)
        output = src
        kept: List[Tensor] = []
        for i, layer in enumerate(self.layers):
            k = count_from_tensor(per_layer[i], S)
            index = torch.topk(foreground_scores, k, dim=1)[1]
            before = gather_tokens(output, index)
            after = layer(
                before, gather_tokens(pos, index), gather_tokens(reference_points, index).view(N, -1, L, 2), src,
                spatial_shapes, level_start_index, padding_mask, torch.gather(foreground_scores, 1, index),
                class_head,
            )
            # an image with fewer valid tokens than the batch's k writes back only its own count
            own = torch.ones_like(index).cumsum(1) <= per_image[:, None]
            after = torch.where(own[..., None], after, before)
            output = output.scatter(1, index.unsqueeze(-1).expand(-1, -1, C), after)
            kept.append(index)
        return output, kept, per_image

    def extra_repr(self) -> str:
        return f"keep_ratio={self.keep_ratio}, cascade_ratios={self.cascade_ratios}"


class FocusDetrTransformer(DinoTransformer):
    """DINO's transformer (mixed query selection) with Focus-DETR's sparse encoder.

    Args: those of :class:`~d2detr.modeling.dino_transformer.DinoTransformer`, with ``encoder`` a
    :class:`FocusEncoder`, and ``alpha_init_range`` of the selector's modulation weights (0.3).

    :meth:`encode` returns the memory and, for the detector's outputs, ``foreground_logits [N, S]``
    (unmasked, what the foreground loss supervises), ``foreground_spatial_shapes [L, 2]``,
    ``kept_token_index`` (per layer ``[N, k_i]``, best first) and ``kept_token_count [N]``.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, embed_dim: int = 256, num_feature_levels: int = 4,
                 two_stage: bool = True, two_stage_num_proposals: int = 900, alpha_init_range: float = 0.3):
        if not isinstance(encoder, FocusEncoder):
            raise TypeError(f"FocusDetrTransformer needs a FocusEncoder, got {type(encoder).__name__}")
        super().__init__(encoder, decoder, embed_dim, num_feature_levels, two_stage, two_stage_num_proposals)
        self.foreground_selector = ForegroundTokenSelector(embed_dim, num_feature_levels, alpha_init_range)

    def foreground_logits(self, src_flatten: Tensor, pos: Tensor, padding_mask: Tensor,
                          spatial_shapes_list: List[Tuple[int, int]]) -> Tensor:
        """The selector's logits ``[N, S]`` from the two-stage ``enc_output`` features of the
        encoder's input (feature + position, padded and out-of-range positions zeroed)."""
        tokens, _ = gen_encoder_output_proposals(src_flatten + pos, padding_mask, spatial_shapes_list)
        return self.foreground_selector(self.enc_output_norm(self.enc_output(tokens)), spatial_shapes_list)

    def encode(self, src_flatten: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
               valid_ratios: Tensor, pos: Tensor, padding_mask: Tensor,
               spatial_shapes_list: List[Tuple[int, int]]) -> Tuple[Tensor, Dict[str, object]]:
        logits = self.foreground_logits(src_flatten, pos, padding_mask, spatial_shapes_list)
        ranking = logits.masked_fill(padding_mask, logits.min())  # padding last, as the release
        class_head, _ = self.proposal_heads()
        memory, kept, per_image = self.encoder(
            src_flatten, spatial_shapes, level_start_index, valid_ratios, pos=pos, padding_mask=padding_mask,
            spatial_shapes_list=spatial_shapes_list, foreground_scores=ranking, class_head=class_head,
        )
        return memory, {"foreground_logits": logits, "foreground_spatial_shapes": spatial_shapes,
                        "kept_token_index": kept, "kept_token_count": per_image}
