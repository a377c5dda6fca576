"""AdaMixer as a Detectron2 meta-architecture: the initial queries refined by ``num_stages``
AdaMixer stages, each with its own weights and its own loss (official code ``MCG-NJU/AdaMixer``,
``AdaMixerDecoder``). The stage itself is shared with RNNDet and DEQDet in
``d2detr/modeling/adamixer.py``."""
from typing import Dict

import torch.nn as nn
from torch import Tensor

from d2detr.modeling.adamixer import AdaMixerDetectorBase, AdaMixerStage, fresh_copy
from d2detr.modeling.meta_arch.detr_base import aux_outputs_list

__all__ = ["AdaMixer"]


class AdaMixer(AdaMixerDetectorBase):
    """
    Args:
        stage: the :class:`AdaMixerStage` config; the model holds ``num_stages`` independently
            initialised copies (``stages.{i}``).
        num_stages: 6.
        others: see :class:`~d2detr.modeling.adamixer.AdaMixerDetectorBase` (backbone, neck,
            queries, criterion, num_classes, ...).

    Training supervises every stage (``loss_*_{i}`` for stages 0..4, plain ``loss_*`` for the
    last), with the query boxes detached between stages and the contents not.
    """

    def __init__(self, *, stage: AdaMixerStage, num_stages: int = 6, **kwargs):
        super().__init__(**kwargs)
        if num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {num_stages}")
        self.check_stage(stage)
        self.stages = nn.ModuleList([fresh_copy(stage) for _ in range(num_stages)])

    def forward_features(self, images, masks: Tensor) -> Dict:
        whwh = self.image_whwh(masks)
        pyramid = self.pyramid(images, masks, self.stages[0].num_groups)
        state = self.queries(whwh)
        per_stage = []
        for stage in self.stages:
            state = stage(pyramid, state)
            per_stage.append(self.stage_outputs(state, whwh))
        out = dict(per_stage[-1])
        if self.training:
            out["aux_outputs"] = aux_outputs_list([o["pred_logits"] for o in per_stage],
                                                  [o["pred_boxes"] for o in per_stage])
        return out
