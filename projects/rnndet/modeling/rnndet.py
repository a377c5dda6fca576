"""RNNDet: DEQDet's paper turns AdaMixer's six independent stages ("FFNDet") into an initial
stage plus one weight-tied refinement stage applied ``K`` times (the RNN view), trained like any
query-based detector: every step supervised, gradients through the whole unroll (BPTT). The paper
has no code for it; this is DEQDet's decoder trained that way."""
from typing import Dict

from torch import Tensor

from d2detr.modeling.adamixer import FeaturePyramid, QueryState, WeightTiedAdaMixerBase
from d2detr.modeling.meta_arch.detr_base import aux_outputs_list

__all__ = ["RNNDet"]


class RNNDet(WeightTiedAdaMixerBase):
    """
    Args:
        refinement_steps: ``K``, the unrolled refinement steps in training (the paper counts
            ``1 + K`` decoder layers, "NF"); inference runs ``test_refinement_steps`` steps,
            by default ``K`` too.
        others: see :class:`~d2detr.modeling.adamixer.WeightTiedAdaMixerBase`.

    Losses: the initial stage (``loss_*_0``) and every refinement step (``loss_*_{k}``; the last
    step's without suffix), each with the full weights, as AdaMixer supervises its stages.
    """

    def __init__(self, *, refinement_steps: int = 5, test_refinement_steps=None, **kwargs):
        if refinement_steps < 1:
            raise ValueError(f"refinement_steps must be >= 1, got {refinement_steps}")
        if test_refinement_steps is None:
            test_refinement_steps = refinement_steps
        super().__init__(test_refinement_steps=test_refinement_steps, **kwargs)
        self.refinement_steps = int(refinement_steps)

    def training_outputs(self, pyramid: FeaturePyramid, first: QueryState, whwh: Tensor) -> Dict:
        per_step = [self.stage_outputs(first, whwh)]
        state = first
        for _ in range(self.refinement_steps):
            state = self.refine(pyramid, state)
            per_step.append(self.stage_outputs(state, whwh))
        out = dict(per_step[-1])
        out["aux_outputs"] = aux_outputs_list([o["pred_logits"] for o in per_step], [o["pred_boxes"] for o in per_step])
        return out
