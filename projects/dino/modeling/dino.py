"""DINO: DETR with Improved DeNoising Anchor Boxes (Zhang et al., ICLR 2023).

DINO is the shared multi-scale detector (:class:`~d2detr.modeling.meta_arch.deformable_detr.DeformableDETR`)
with three changes, all in ``d2detr/modeling`` because Focus-DETR builds on them too:

* contrastive denoising training (:class:`~d2detr.modeling.denoising.ContrastiveDenoising`):
  positive and negative noised ground-truth queries in groups, kept apart by a self-attention
  mask, with their own losses on every decoder layer;
* mixed query selection (:class:`~d2detr.modeling.dino_transformer.DinoTransformer`): the top-900
  encoder proposals give the anchors, the content queries stay learned;
* look forward twice (``AnchorDeformableDecoder(look_forward_twice=True)``): a layer's box loss
  also trains the previous layer's box head.

Heads are shared across decoder layers and the logit-space eps is 1e-3, as in the official code
(IDEA-Research/DINO). This class only checks that a configuration is DINO and fixes those defaults.
"""
from torch import nn

from d2detr.modeling.denoising import ContrastiveDenoising
from d2detr.modeling.dino_transformer import DinoTransformer
from d2detr.modeling.meta_arch.deformable_detr import DeformableDETR

__all__ = ["DINO"]


class DINO(DeformableDETR):
    """
    Args:
        transformer: a :class:`DinoTransformer` (mixed query selection) whose decoder is an
            ``AnchorDeformableDecoder`` without query scale, with a final LayerNorm and
            ``look_forward_twice=True``.
        denoising: :class:`ContrastiveDenoising`, or None to train without denoising queries
            (the paper's ablation).
        num_queries: 900. Other arguments: :class:`DeformableDETR`'s, with DINO's defaults
            (box refinement, shared decoder heads, ``inverse_sigmoid_eps=1e-3``, top-300 detections).
    """

    def __init__(self, *, transformer: nn.Module, denoising: ContrastiveDenoising = None, num_queries: int = 900,
                 with_box_refine: bool = True, share_decoder_heads: bool = True,
                 inverse_sigmoid_eps: float = 1e-3, select_box_nums_for_evaluation: int = 300, **kwargs):
        if not isinstance(transformer, DinoTransformer):
            raise TypeError(f"DINO needs a DinoTransformer (mixed query selection), got {type(transformer).__name__}")
        super().__init__(transformer=transformer, denoising=denoising, num_queries=num_queries,
                         with_box_refine=with_box_refine, share_decoder_heads=share_decoder_heads,
                         inverse_sigmoid_eps=inverse_sigmoid_eps,
                         select_box_nums_for_evaluation=select_box_nums_for_evaluation, **kwargs)
