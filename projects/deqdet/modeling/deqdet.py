"""DEQDet (Wang et al., ICCV 2023; official code ``MCG-NJU/DEQDet``, ``projects/deqdet``).

The decoder is an initial AdaMixer stage ``g`` and one refinement stage ``f`` whose fixed point
``q* = f(q*, image)`` is the detection. It is solved by plain fixed-point iteration (no
Anderson/Broyden, as the official code). Training (``DEQDetRoIHead.loss``):

1. ``q0 = g(queries)``, supervised (``*_init``), plus ``init_extra_steps`` = 2 steps ``f(q0)``,
   ``f(f(q0))`` with gradient, each supervised (``*_init1``, ``*_init2``);
2. from the detached ``q0``, ``refinement_steps`` = 20 steps of ``f`` **without gradient**; before
   each, the refinement-aware perturbation (RAP): with probability 0.2 the contents become
   ``0.9 c + 0.1 ||c|| N(0, I)``, with probability 0.2 the boxes move by ``25 px * N(0, 1)``
   (one decision per step for the whole batch);
3. after the steps in ``supervision_steps`` = (1, 3, 6, 9, 12, 20), the refinement-aware gradient
   (RAG): ``rag_steps`` = 2 more steps of ``f`` **with** gradient from the detached state, and the
   loss on their result (``*_step{i}``).

Every loss goes into the one dict the model returns, so Detectron2's single ``backward()``, AMP
loss scaling, gradient clipping and DDP see all of them. The official code instead calls
``backward()`` on each RAG loss inside its loss function (keeping at most one RAG graph alive);
:func:`~d2detr.projects.deqdet.modeling.in_loss_backward.in_loss_backward_step` is that
formulation, used to check that the gradients are the same and to measure what the single dict
costs in memory (``tools/benchmark_deqdet_memory.py``). ``checkpoint_refinement=True`` bounds it.

Inference: ``q0 = g(queries)`` and ``test_refinement_steps`` = 21 steps of ``f`` (the official
``predict``: 20 steps, then one more for the output).
"""
from typing import Dict, Iterator, Sequence, Tuple

import torch
from torch import Tensor

from d2detr.modeling.adamixer import FeaturePyramid, QueryState, WeightTiedAdaMixerBase, boxes_to_xyzr

__all__ = ["DEQDet"]


def _detach(state: QueryState) -> QueryState:
    return QueryState(*(t.detach() if t is not None else None for t in state))


class DEQDet(WeightTiedAdaMixerBase):
    """
    Args:
        refinement_steps: no-grad fixed-point steps in training (20).
        supervision_steps: the steps after which RAG + a loss follow ((1, 3, 6, 9, 12, 20)).
        rag_steps: refinement steps with gradient before each of those losses (2).
        init_extra_steps: supervised steps with gradient right after the initial stage (2).
        perturb_content_prob, perturb_content_intensity: RAP on the contents (0.2, 0.1).
        perturb_position_prob, perturb_position_intensity: RAP on the boxes (0.2, 25 pixels).
        test_refinement_steps: refinement steps at inference (21).
        others: see :class:`~d2detr.modeling.adamixer.WeightTiedAdaMixerBase`.
    """

    def __init__(
        self,
        *,
        refinement_steps: int = 20,
        supervision_steps: Sequence[int] = (1, 3, 6, 9, 12, 20),
        rag_steps: int = 2,
        init_extra_steps: int = 2,
        perturb_content_prob: float = 0.2,
        perturb_content_intensity: float = 0.1,
        perturb_position_prob: float = 0.2,
        perturb_position_intensity: float = 25.0,
        test_refinement_steps: int = 21,
        **kwargs,
    ):
        super().__init__(test_refinement_steps=test_refinement_steps, **kwargs)
        supervision_steps = sorted(int(s) for s in supervision_steps)
        if refinement_steps < 0 or rag_steps < 0 or init_extra_steps < 0:
            raise ValueError("refinement_steps, rag_steps and init_extra_steps must be >= 0")
        if any(not 1 <= s <= refinement_steps for s in supervision_steps):
            raise ValueError(f"supervision_steps {supervision_steps} must lie in [1, refinement_steps={refinement_steps}]")
        for name, p in (("perturb_content_prob", perturb_content_prob), ("perturb_position_prob", perturb_position_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability, got {p}")
        self.refinement_steps = int(refinement_steps)
        self.supervision_steps = tuple(supervision_steps)
        self.rag_steps = int(rag_steps)
        self.init_extra_steps = int(init_extra_steps)
        self.perturb_content_prob = float(perturb_content_prob)
        self.perturb_content_intensity = float(perturb_content_intensity)
        self.perturb_position_prob = float(perturb_position_prob)
        self.perturb_position_intensity = float(perturb_position_intensity)

    @torch.no_grad()
    def perturb(self, state: QueryState) -> QueryState:
        """RAP: the content and the position perturbation, each with its probability."""
        xyzr, content, boxes, logits = state
        if bool(torch.rand(1) < self.perturb_content_prob):
            a = self.perturb_content_intensity
            content = (1 - a) * content + content.norm(dim=-1, keepdim=True) * torch.randn_like(content) * a
        if bool(torch.rand(1) < self.perturb_position_prob):
            boxes = boxes + torch.randn_like(xyzr) * self.perturb_position_intensity
            xyzr = boxes_to_xyzr(boxes)
        return QueryState(xyzr, content, boxes, logits)

    def supervised_states(
        self, pyramid: FeaturePyramid, refine_pyramid: FeaturePyramid, first: QueryState
    ) -> Iterator[Tuple[str, QueryState, bool]]:
        """The supervised states in the official order, as ``(loss suffix, state, is_rag)``.
        ``refine_pyramid`` feeds the fixed-point and RAG steps (the official code uses leaf copies
        of the features there, see ``in_loss_backward``); normally it is ``pyramid``."""
        yield "_init", first, False
        state = first
        for i in range(self.init_extra_steps):
            state = self.refine(pyramid, state)
            yield f"_init{i + 1}", state, False
        state = _detach(first)
        for step in range(1, self.refinement_steps + 1):
            with torch.no_grad():
                state = self.refine_stage(refine_pyramid, self.perturb(state))
            if step in self.supervision_steps:
                supervised = state
                for _ in range(self.rag_steps):
                    supervised = self.refine(refine_pyramid, supervised)
                yield f"_step{step}", supervised, True

    def training_outputs(self, pyramid: FeaturePyramid, first: QueryState, whwh: Tensor) -> Dict:
        sets = [(suffix, self.stage_outputs(s, whwh)) for suffix, s, _ in self.supervised_states(pyramid, pyramid, first)]
        out = dict(sets[-1][1])
        out["loss_sets"] = sets
        return out
