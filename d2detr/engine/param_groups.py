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
from typing import Mapping

__all__ = ["LrFactorByName"]


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
