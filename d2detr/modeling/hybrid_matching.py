"""Hybrid matching, the *hybrid branch* scheme of H-DETR (Jia et al., CVPR 2023, "DETRs with Hybrid
Matching"), for the two-stage anchor-query models (DINO, Focus-DETR).

In training, the decoder gets a second set of ``num_one2many`` queries beside the usual
``num_queries`` one-to-one queries. The one-to-many set is trained against the ground truth
repeated ``K`` times (each object is matched, by the same Hungarian matcher, to up to ``K``
queries), so every object supervises many queries per step: the dense supervision that makes
one-to-many detectors (Faster R-CNN, RetinaNet) converge quickly. The two sets cannot see each
other in self-attention, so the one-to-one set is exactly the model used at inference, which
keeps needing no NMS. At inference and in exported graphs the one-to-many set is never built.

Two-stage selection follows H-DETR: the top ``num_queries + num_one2many`` encoder proposals
are selected in training; the first ``num_queries`` (the highest-scoring ones, the same as
without hybrid matching) are the one-to-one queries, the rest the one-to-many queries. The
one-to-many losses (``_one2many`` and ``_one2many_{i}`` keys, every decoder layer) use the
one-to-one weights (H-DETR's ``lambda_one2many = 1``).

With DINO's denoising queries, the denoising groups see the one-to-one queries (as in DINO) but
not the one-to-many ones, and the one-to-many queries see neither denoising group: H-DETR has no
denoising, and this keeps DINO's denoising part exactly as it is.
"""
from typing import Dict, List, Optional

import torch
from torch import Tensor

__all__ = ["hybrid_attn_mask", "repeat_targets"]


def hybrid_attn_mask(num_one2one: int, num_one2many: int, num_denoising: int = 0,
                     denoising_mask: Optional[Tensor] = None, device=None) -> Optional[Tensor]:
    """``[P + Q + H, P + Q + H]`` bool self-attention mask (True = may not attend) for ``P``
    denoising queries, then ``Q`` one-to-one and ``H`` one-to-many queries: the one-to-one and the
    one-to-many queries do not see each other, the denoising queries do not see the one-to-many
    ones nor these the denoising ones. ``denoising_mask`` (``[P + Q + H]²``, what
    :func:`~d2detr.modeling.denoising.denoising_attn_mask` gives for ``Q + H`` matching queries)
    is kept where it blocks. None when nothing is blocked (no one-to-many queries, no denoising)."""
    if num_one2many == 0:
        return denoising_mask
    p, q, h = num_denoising, num_one2one, num_one2many
    n = p + q + h
    if denoising_mask is not None:
        if tuple(denoising_mask.shape) != (n, n):
            raise ValueError(f"denoising mask of shape {tuple(denoising_mask.shape)}, expected {(n, n)}")
        mask = denoising_mask.clone()
        device = mask.device
    else:
        mask = torch.zeros(n, n, dtype=torch.bool, device=device)
    one2many = torch.zeros(n, dtype=torch.bool, device=device)
    one2many[p + q:] = True
    # a one-to-many query and any other query (denoising or one-to-one) are blocked both ways
    mask |= one2many[:, None] ^ one2many[None, :]
    return mask


def repeat_targets(targets: List[Dict[str, Tensor]], k: int) -> List[Dict[str, Tensor]]:
    """Each image's ``labels`` and ``boxes`` repeated ``k`` times (the one-to-many targets); the
    other keys are kept."""
    if k < 1:
        raise ValueError(f"the one-to-many repeat must be >= 1, got {k}")
    return [dict(t, labels=t["labels"].repeat(k), boxes=t["boxes"].repeat(k, 1)) for t in targets]
