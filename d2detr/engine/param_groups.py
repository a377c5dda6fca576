"""Per-parameter learning-rate factors for ``get_default_optimizer_params``.

DETR-family papers train some parameters at a fraction of the base learning rate:
the backbone at ×0.1 everywhere, and in Deformable DETR and its descendants also the
linear projections that predict ``sampling_offsets`` and ``reference_points`` (×0.1).
Detectron2's :func:`~detectron2.solver.get_default_optimizer_params` accepts an
``lr_factor_func(param_name) -> float``; :class:`LrFactorByName` is such a function,
built from a mapping, so configs stay serialisable (no lambdas)::

    optimizer.params.lr_factor_func = L(LrFactorByName)(
        factors={"backbone": 0.1, "sampling_offsets": 0.1, "reference_points": 0.1})
"""
from typing import Callable, Dict, List, Mapping, Optional

__all__ = ["LrFactorByName", "get_optimizer_params_with_factors"]


class LrFactorByName:
    """``lr_factor_func`` that maps a parameter's full name to a learning-rate factor.

    Args:
        factors: ``{substring: factor}``. A parameter whose name (e.g.
            ``"backbone.0.body.layer1.0.conv1.weight"``) contains a substring gets its
            factor; the first matching key in the mapping's order wins; 1.0 otherwise.
            Keys match whole dot-separated name components or runs of them, so
            ``"backbone"`` does not match ``"my_backbone_proj"``.
    """

    def __init__(self, factors: Mapping[str, float]):
        self.factors = {str(k): float(v) for k, v in dict(factors).items()}

    def __call__(self, name: str) -> float:
        padded = "." + name + "."
        for key, factor in self.factors.items():
            if "." + key.strip(".") + "." in padded:
                return factor
        return 1.0

    def __repr__(self):
        return f"LrFactorByName({self.factors})"


def get_optimizer_params_with_factors(
    model,
    base_lr: float,
    weight_decay: float,
    lr_factor_func: Optional[Callable[[str], float]] = None,
    weight_decay_factor_func: Optional[Callable[[str], float]] = None,
    **kwargs,
) -> List[Dict]:
    """Detectron2's ``get_default_optimizer_params`` plus a per-parameter weight-decay factor
    (``weight_decay_factor_func(param_name) -> float``, e.g. an :class:`LrFactorByName`), like
    mmengine's ``paramwise_cfg`` ``decay_mult`` (DEQDet: its decoder at lr x4 and weight decay x10).
    ``kwargs`` go to ``get_default_optimizer_params``."""
    from detectron2.solver.build import get_default_optimizer_params, reduce_param_groups

    groups = get_default_optimizer_params(
        model, base_lr=base_lr, weight_decay=weight_decay, lr_factor_func=lr_factor_func, **kwargs
    )
    if weight_decay_factor_func is None:
        return groups
    names = {id(p): n for n, p in model.named_parameters()}
    split = []
    for group in groups:
        for p in group["params"]:
            factor = float(weight_decay_factor_func(names[id(p)]))
            split.append({**group, "params": [p], "weight_decay": group["weight_decay"] * factor})
    return reduce_param_groups(split)
