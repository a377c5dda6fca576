"""DAB-Deformable-DETR (Liu et al., ICLR 2022): Deformable DETR whose queries are learned content
embeddings plus learned 4-D anchor boxes.

What DAB adds, following the official implementation (IDEA-Research/DAB-DETR,
``models/dab_deformable_detr``): the queries (:meth:`DABDeformableDETR.init_queries`) and a decoder
that derives every layer's positional query from its current anchor,
``query_pos = MLP(PE(anchor)) * (1 if first layer else query_scale(f))`` -- the shared
:class:`~d2detr.modeling.deformable_transformer.AnchorDeformableDecoder`. Everything else (backbone,
neck, encoder, per-layer heads with iterative box refinement, two-stage proposals, losses,
inference) is the shared :class:`~d2detr.modeling.meta_arch.deformable_detr.DeformableDETR`.
"""
import torch
from torch import nn

from d2detr.layers.box_ops import inverse_sigmoid
from d2detr.modeling.meta_arch.deformable_detr import DeformableDETR

__all__ = ["DABDeformableDETR"]


class DABDeformableDETR(DeformableDETR):
    """
    Args:
        transformer: a ``DeformableDetrTransformer`` with an ``AnchorDeformableDecoder``.
        random_refpoints_xy: initialise the anchor centres uniformly in [0, 1] (still learned).
        with_box_refine: refine the anchors layer by layer (the paper's dynamic anchors; True).
        Other arguments: see :class:`DeformableDETR`.

    Outputs add ``anchors [L, N, Q, 4]``: the anchor box each decoder layer started from.
    """

    def __init__(self, *, transformer: nn.Module, num_queries: int = 300, embed_dim: int = 256,
                 random_refpoints_xy: bool = False, with_box_refine: bool = True, **kwargs):
        if not getattr(transformer.decoder, "derives_query_pos", False):
            raise TypeError("DAB-Deformable-DETR needs a decoder that derives positions from anchors "
                            f"(AnchorDeformableDecoder), got {type(transformer.decoder).__name__}")
        self.random_refpoints_xy = random_refpoints_xy  # read by init_queries() during super().__init__
        super().__init__(transformer=transformer, num_queries=num_queries, embed_dim=embed_dim,
                         with_box_refine=with_box_refine, **kwargs)

    def init_queries(self) -> None:
        """Content ``tgt_embed [Q, C]`` and anchor ``refpoint_embed [Q, 4]`` (logits); none for two-stage."""
        if self.two_stage:
            return
        self.tgt_embed = nn.Embedding(self.num_queries, self.embed_dim)
        self.refpoint_embed = nn.Embedding(self.num_queries, 4)
        if self.random_refpoints_xy:
            with torch.no_grad():
                self.refpoint_embed.weight[:, :2].uniform_(0, 1)
                self.refpoint_embed.weight[:, :2] = inverse_sigmoid(self.refpoint_embed.weight[:, :2])

    def query_inputs(self):
        return None if self.two_stage else (self.tgt_embed.weight, self.refpoint_embed.weight)
