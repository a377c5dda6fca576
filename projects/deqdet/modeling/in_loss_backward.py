"""The official DEQDet training step: each RAG loss back-propagated inside the loss function.

``DEQDetRoIHead.loss`` (``MCG-NJU/DEQDet``, ``grad_accumulation=True``) gives the refinement loop
detached leaf copies of the features, calls ``backward()`` on every RAG loss as soon as it is
computed (so only one RAG graph is alive at a time) and stashes the gradient the leaves collect;
a hook adds it to the real features' gradient when the caller back-propagates the remaining
(initial-stage) losses. The returned RAG losses are detached.

Here it serves two purposes only: the test that DEQDet's single loss dict yields the same
gradients, and ``tools/benchmark_deqdet_memory.py``, which measures what keeping all RAG graphs
until one ``backward()`` costs. It bypasses AMP loss scaling and calls ``backward()`` more than
once per step, which is why the model itself does not train this way.
"""
from typing import Dict, List

import torch
from torch import Tensor

__all__ = ["in_loss_backward_step"]


def in_loss_backward_step(model, batched_inputs: List[Dict]) -> Dict[str, Tensor]:
    """Forward + every backward of one training step of ``model`` (a :class:`DEQDet` in training
    mode) in the official order; gradients accumulate in ``.grad``. Returns the losses, detached."""
    if not model.training:
        raise RuntimeError("in_loss_backward_step needs the model in training mode")
    images, masks = model.preprocess_image(batched_inputs)
    targets = model.prepare_targets([x["instances"] for x in batched_inputs])
    whwh = model.image_whwh(masks)
    pyramid = model.pyramid(images, masks, model.init_stage.num_groups)
    leaf_value = pyramid.value.detach().requires_grad_(True)

    def add_stashed(grad: Tensor) -> Tensor:
        return grad if leaf_value.grad is None else grad + leaf_value.grad

    pyramid.value.register_hook(add_stashed)
    leaf_pyramid = pyramid._replace(value=leaf_value)

    first = model.init_stage(pyramid, model.queries(whwh))
    criterion = model.criterion
    num_boxes = criterion.get_num_boxes(targets, whwh.device)
    losses: Dict[str, Tensor] = {}
    kept = []
    for suffix, state, is_rag in model.supervised_states(pyramid, leaf_pyramid, first):
        set_losses = criterion.compute_set_losses(model.stage_outputs(state, whwh), targets, num_boxes, suffix)
        if is_rag:
            sum(set_losses.values()).backward()
        else:
            kept.extend(set_losses.values())
        losses.update({k: v.detach() for k, v in set_losses.items()})
    torch.stack(kept).sum().backward()
    return losses
