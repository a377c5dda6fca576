"""Look inside a detector: where each decoder query attends.

:class:`AttentionRecorder` hooks a DETRBase model without changing its code:

* every ``MultiScaleDeformableAttention`` (deformable methods): its inputs (query, reference
  points, spatial shapes, ...) and the outputs of its ``sampling_offsets`` and
  ``attention_weights`` projections, from which :func:`deformable_sampling` rebuilds the
  sampling locations and their softmax weights exactly as the module computes them (a test
  feeds them back through ``ms_deform_attn`` and gets the module's output);
* every ``nn.MultiheadAttention`` (DETR-style decoders) is asked for per-head weights
  (``need_weights=True, average_attn_weights=False``); other attention modules that return
  ``(output, weights)`` (e.g. Conditional DETR's) are recorded as they are.

Records are kept in call order with the module's name, so "the cross-attention of the last
decoder layer" is ``[r for r in recorder.records if r.kind == ... and "decoder" in r.name][-1]``.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2detr.layers.ms_deform_attn import MultiScaleDeformableAttention

__all__ = ["AttentionRecord", "AttentionRecorder", "deformable_sampling"]


@dataclass
class AttentionRecord:
    name: str
    kind: str  # "deformable" or "dense"
    module: nn.Module
    data: Dict[str, Any] = field(default_factory=dict)


def deformable_sampling(module: MultiScaleDeformableAttention, record: AttentionRecord) -> Tuple[Tensor, Tensor]:
    """``(sampling_locations [N,Q,M,L,P,2] (x, y) normalised to the padded level maps,
    attention_weights [N,Q,M,L,P])`` of one recorded call, as the module computed them."""
    d = record.data
    query, reference_points, spatial_shapes = d["query"], d["reference_points"], d["spatial_shapes"]
    N, Q, _ = query.shape
    M, L, P = module.num_heads, module.num_levels, module.num_points
    offsets = d["sampling_offsets"].view(N, Q, M, L, P, 2)
    weights = F.softmax(d["attention_weights"].view(N, Q, M, L * P), -1).view(N, Q, M, L, P)
    if reference_points.shape[-1] == 2:
        normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(offsets.dtype)
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    else:
        locations = (
            reference_points[:, :, None, :, None, :2]
            + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5
        )
    return locations, weights


class AttentionRecorder:
    """Context manager recording the attention of every attention module of ``model``."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.records: List[AttentionRecord] = []
        self._handles = []

    def __enter__(self):
        for name, m in self.model.named_modules():
            if isinstance(m, MultiScaleDeformableAttention):
                self._hook_deformable(name, m)
            elif isinstance(m, nn.MultiheadAttention):
                self._hook_mha(name, m)
            elif name.endswith("attn") and hasattr(m, "out_proj"):  # e.g. ConditionalAttention
                self._hook_returning_weights(name, m)
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ hooks
    def _hook_deformable(self, name: str, m: MultiScaleDeformableAttention) -> None:
        pending: Dict[str, Tensor] = {}

        def grab(key):
            def hook(_mod, _inp, out):
                pending[key] = out.detach()

            return hook

        def after(mod, args, kwargs, out):
            names = ["query", "reference_points", "value", "spatial_shapes", "level_start_index", "value_padding_mask"]
            data = dict(zip(names, args))
            data.update({k: v for k, v in kwargs.items() if k in names})
            data = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in data.items()}
            data.update(pending)
            data["output"] = out.detach()
            pending.clear()
            self.records.append(AttentionRecord(name, "deformable", mod, data))

        self._handles.append(m.sampling_offsets.register_forward_hook(grab("sampling_offsets")))
        self._handles.append(m.attention_weights.register_forward_hook(grab("attention_weights")))
        self._handles.append(m.register_forward_hook(after, with_kwargs=True))

    def _hook_mha(self, name: str, m: nn.MultiheadAttention) -> None:
        def before(_mod, args, kwargs):
            kwargs = dict(kwargs)
            kwargs["need_weights"] = True
            kwargs["average_attn_weights"] = False
            return args, kwargs

        def after(mod, args, kwargs, out):
            weights = out[1]
            if weights is None:
                return
            if weights.dim() == 3:  # unbatched
                weights = weights[None]
            self.records.append(AttentionRecord(name, "dense", mod, {"weights": weights.detach()}))

        self._handles.append(m.register_forward_pre_hook(before, with_kwargs=True))
        self._handles.append(m.register_forward_hook(after, with_kwargs=True))

    def _hook_returning_weights(self, name: str, m: nn.Module) -> None:
        def after(mod, _args, out):
            if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Tensor) and out[1].dim() in (3, 4):
                w = out[1].detach()
                self.records.append(AttentionRecord(name, "dense", mod, {"weights": w if w.dim() == 4 else w[:, None]}))

        self._handles.append(m.register_forward_hook(after))

    # ---------------------------------------------------------------- queries
    def decoder_cross_attention(self, num_queries: int, layer: int = -1) -> Optional[AttentionRecord]:
        """The decoder cross-attention record of decoder layer ``layer`` (-1: the last): records
        in modules named ``*decoder*`` whose queries are the ``num_queries`` object queries and
        whose keys are not (dense) / which sample the memory (deformable)."""
        picked = []
        for r in self.records:
            if "decoder" not in r.name:
                continue
            if r.kind == "deformable" and r.data["query"].shape[1] == num_queries:
                picked.append(r)
            elif r.kind == "dense":
                w = r.data["weights"]  # [B, heads, Q, S]
                if w.shape[-2] == num_queries and "self" not in r.name.split(".")[-1]:
                    picked.append(r)
        if not picked:
            return None
        return picked[layer]
