"""Focus-DETR: Less is More: Focus Attention for Efficient DETR (Zheng et al., ICCV 2023).

DINO (the shared multi-scale detector with contrastive denoising, mixed query selection and
look-forward-twice) whose encoder only updates foreground tokens: a foreground token selector
scores every multi-scale token, the encoder layers update a cascade of the best-scored ones, and a
dual attention re-attends the finest-grained of them (:mod:`.transformer`, :mod:`.foreground`).
The selector is supervised with FCOS-style foreground labels (:class:`.criterion.FocusCriterion`).

The layout follows the PyTorch release (huawei-noah/noah-research ``Focus-DETR``, built on detrex's
DINO): per-layer decoder heads (the two-stage proposal heads are the extra last entries, and the
dual attention ranks with that proposal class head), ``inverse_sigmoid`` eps 1e-3, a label
embedding of ``num_classes`` rows. This class checks a configuration is Focus-DETR, sets those
defaults, and gives the criterion each image's size (for the foreground labels).
"""
from typing import Dict, List

import torch
from detectron2.structures import Instances
from torch import Tensor, nn

from d2detr.modeling.meta_arch.deformable_detr import DeformableDETR

from .transformer import FocusDetrTransformer

__all__ = ["FocusDETR"]


class FocusDETR(DeformableDETR):
    """
    Args:
        transformer: a :class:`~.transformer.FocusDetrTransformer`.
        denoising: :class:`~d2detr.modeling.denoising.ContrastiveDenoising` (or None).
        criterion: a :class:`~.criterion.FocusCriterion` (or None for inference only).
        num_queries: 900. Other arguments: :class:`DeformableDETR`'s with the release's defaults
            (box refinement, per-layer decoder heads, ``inverse_sigmoid_eps=1e-3``, top-300 detections).

    Besides DINO's outputs, ``forward_features`` returns ``foreground_logits [N, S]``,
    ``foreground_spatial_shapes``, ``kept_token_index`` (per encoder layer ``[N, k_i]``) and
    ``kept_token_count [N]`` (what ``tools/visualize_attention.py --kept-tokens`` draws).
    """

    def __init__(self, *, transformer: nn.Module, denoising: nn.Module = None, num_queries: int = 900,
                 with_box_refine: bool = True, share_decoder_heads: bool = False,
                 inverse_sigmoid_eps: float = 1e-3, select_box_nums_for_evaluation: int = 300, **kwargs):
        if not isinstance(transformer, FocusDetrTransformer):
            raise TypeError(f"FocusDETR needs a FocusDetrTransformer, got {type(transformer).__name__}")
        super().__init__(transformer=transformer, denoising=denoising, num_queries=num_queries,
                         with_box_refine=with_box_refine, share_decoder_heads=share_decoder_heads,
                         inverse_sigmoid_eps=inverse_sigmoid_eps,
                         select_box_nums_for_evaluation=select_box_nums_for_evaluation, **kwargs)

    def prepare_targets(self, instances: List[Instances]) -> List[Dict[str, Tensor]]:
        """DETR's targets plus ``image_size`` (h, w) of each unpadded input: the foreground labels
        are laid out on the feature grids in input pixels."""
        targets = super().prepare_targets(instances)
        for t, inst in zip(targets, instances):
            t["image_size"] = torch.tensor(inst.image_size, dtype=torch.float32, device=self.device)
        return targets
