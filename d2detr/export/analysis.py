"""Model statistics with fvcore: parameters, FLOPs and activations at a given input size,
counted on :class:`~d2detr.export.wrapper.ExportableDetector` (one image, the whole inference
graph including pre/post-processing).

fvcore counts one fused multiply-add as one "flop" (so its GFLOPs are GMACs, the convention
the DETR papers' tables use). Handles added here for what fvcore does not know:

* ``d2detr::ms_deform_attn``: ``N·Q·M·D·L·P·5`` -- per sampling point and channel, bilinear
  interpolation (4 MACs) plus the attention weight (1 MAC);
* ``aten::scaled_dot_product_attention`` (what ``nn.MultiheadAttention`` calls):
  ``2·B·H·Lq·Lk·D`` (``QKᵀ`` and ``attn·V``);
* ``aten::_native_multi_head_attention`` (its fused inference path): the projections too.
"""
from collections import Counter
from typing import Any, Dict, List, Sequence

import torch
from fvcore.nn import ActivationCountAnalysis, FlopCountAnalysis, parameter_count
from fvcore.nn.jit_handles import get_shape
from torch import nn

from .wrapper import ExportableDetector

__all__ = ["ms_deform_attn_flop_jit", "sdpa_flop_jit", "analyze_model", "format_table", "format_comparison"]


def ms_deform_attn_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    value, sampling_locations = get_shape(inputs[0]), get_shape(inputs[3])
    N, _, M, D = value
    _, Q, _, L, P, _ = sampling_locations
    return N * Q * M * D * L * P * 5


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    q, k = get_shape(inputs[0]), get_shape(inputs[1])
    *batch, Lq, D = q
    Lk = k[-2]
    b = 1
    for x in batch:
        b *= x
    return 2 * b * Lq * Lk * D


def native_mha_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    q, k = get_shape(inputs[0]), get_shape(inputs[1])
    B, Lq, E = q
    Lk = k[1]
    return B * (Lq + 2 * Lk) * E * E + 2 * B * Lq * Lk * E + B * Lq * E * E


_HANDLES = {
    "d2detr::ms_deform_attn": ms_deform_attn_flop_jit,
    "aten::scaled_dot_product_attention": sdpa_flop_jit,
    "aten::_native_multi_head_attention": native_mha_flop_jit,
}
# Cheap elementwise/indexing ops: not counted, and not worth a warning each.
_IGNORED = [
    "aten::sigmoid", "aten::softmax", "aten::topk", "aten::gather", "aten::cumsum", "aten::sin",
    "aten::cos", "aten::pow", "aten::clamp", "aten::minimum", "aten::log", "aten::exp", "aten::sum",
    "aten::sort", "aten::repeat", "aten::floor_divide", "aten::remainder", "aten::fill_", "aten::full",
    "aten::max_pool2d", "aten::hardtanh", "aten::hardtanh_", "aten::relu", "aten::relu_", "aten::gelu",
    "aten::div", "aten::mul", "aten::add", "aten::sub", "aten::rsub", "aten::neg", "aten::masked_fill",
    "aten::bitwise_not", "aten::upsample_nearest2d", "aten::max", "aten::mean", "aten::reciprocal",
    "aten::lt", "aten::gt", "aten::le", "aten::ge", "aten::eq", "aten::ne", "aten::__and__",
    "aten::__or__", "aten::all", "aten::any", "aten::where", "aten::abs", "aten::sqrt", "aten::rsqrt",
    "aten::floor", "aten::ceil", "aten::round", "aten::add_", "aten::mul_", "aten::div_", "aten::sub_",
    "aten::prod", "aten::linspace", "aten::arange", "aten::clamp_min", "aten::clamp_max", "aten::meshgrid",
    "aten::ones_like", "aten::zeros_like", "aten::masked_fill_",
    # gathering / scattering tokens (sparse encoders) and shape bookkeeping
    "aten::scatter", "aten::expand_as", "aten::_shape_as_tensor", "aten::min",
]


def analyze_model(model: nn.Module, image: torch.Tensor, submodules: Sequence[str] = ()) -> Dict:
    """``{"input_size", "params", "trainable_params", "flops", "activations", "by_module":
    {name: {"params", "flops", "activations"}}, "submodules": {name: {"params", "flops"}},
    "flops_by_operator", "unsupported_ops"}`` for ``model`` on one ``[3, H, W]`` image. FLOPs are
    fvcore's (multiply-adds). ``submodules``: dotted names inside the model (``transformer.encoder``)
    to report as well; a module called twice counts both calls."""
    wrapper = ExportableDetector(model).eval()
    inputs = (image,)
    flops = FlopCountAnalysis(wrapper, inputs).set_op_handle(**_HANDLES)
    flops.set_op_handle(**{name: None for name in _IGNORED})
    flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    acts = ActivationCountAnalysis(wrapper, inputs)
    acts.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with torch.no_grad():
        total_flops = flops.total()
        total_acts = acts.total()
        flops_by_module = flops.by_module()
        acts_by_module = acts.by_module()
    params = parameter_count(model)
    by_module = {}
    for name, _ in model.named_children():
        by_module[name] = {
            "params": int(params.get(name, 0)),
            "flops": int(flops_by_module.get(f"model.{name}", 0)),
            "activations": int(acts_by_module.get(f"model.{name}", 0)),
        }
    modules = dict(model.named_modules())
    missing = [name for name in submodules if name not in modules]
    if missing:
        raise ValueError(f"{type(model).__name__} has no submodule {missing}")
    submodule_stats = {
        name: {"params": int(params.get(name, 0)), "flops": int(flops_by_module.get(f"model.{name}", 0))}
        for name in submodules
    }
    return {
        "model": type(model).__name__,
        "input_size": [int(image.shape[-2]), int(image.shape[-1])],
        "params": int(params[""]),
        "trainable_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "flops": int(total_flops),
        "activations": int(total_acts),
        "by_module": by_module,
        "submodules": submodule_stats,
        "flops_by_operator": {k: int(v) for k, v in flops.by_operator().items()},
        "unsupported_ops": dict(Counter(flops.unsupported_ops())),
    }


def format_table(stats: Dict) -> str:
    """A Markdown table: one row per top-level module and a total row."""
    h, w = stats["input_size"]
    lines = [
        f"{stats['model']} at {h}x{w} (fvcore; FLOPs = multiply-adds)",
        "",
        "| module | params (M) | GFLOPs | activations (M) |",
        "|---|---:|---:|---:|",
    ]
    for name, row in stats["by_module"].items():
        if row["params"] or row["flops"] or row["activations"]:
            lines.append(
                f"| {name} | {row['params'] / 1e6:.3f} | {row['flops'] / 1e9:.3f} | {row['activations'] / 1e6:.3f} |"
            )
    for name, row in stats.get("submodules", {}).items():
        lines.append(f"| {name} | {row['params'] / 1e6:.3f} | {row['flops'] / 1e9:.3f} | |")
    lines.append(
        f"| **total** | **{stats['params'] / 1e6:.3f}** | **{stats['flops'] / 1e9:.3f}** | "
        f"**{stats['activations'] / 1e6:.3f}** |"
    )
    if stats["unsupported_ops"]:
        lines += ["", "not counted: " + ", ".join(f"{k} x{v}" for k, v in sorted(stats["unsupported_ops"].items()))]
    return "\n".join(lines)


def format_comparison(stats: Dict, baseline: Dict, names: Sequence[str] = ()) -> str:
    """A Markdown table of ``stats`` beside ``baseline`` (two :func:`analyze_model` results at the
    same input size): GFLOPs and parameters of the whole model and of ``names`` (top-level modules
    or submodules of both), with the ratio to the baseline."""
    def row_of(s: Dict, name: str) -> Dict:
        if name == "total":
            return {"params": s["params"], "flops": s["flops"]}
        found = s.get("submodules", {}).get(name) or s["by_module"].get(name)
        if found is None:
            raise KeyError(f"{s['model']}: no statistics for {name!r} (pass it in submodules)")
        return found

    h, w = stats["input_size"]
    a, b = stats["model"], baseline["model"]
    lines = [
        f"{a} vs {b} at {h}x{w} (fvcore; FLOPs = multiply-adds)",
        "",
        f"| module | {a} GFLOPs | {b} GFLOPs | ratio | {a} params (M) | {b} params (M) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in list(names) + ["total"]:
        x, y = row_of(stats, name), row_of(baseline, name)
        ratio = f"{x['flops'] / y['flops']:.1%}" if y["flops"] else "-"
        lines.append(f"| {name} | {x['flops'] / 1e9:.2f} | {y['flops'] / 1e9:.2f} | {ratio} | "
                     f"{x['params'] / 1e6:.2f} | {y['params'] / 1e6:.2f} |")
    return "\n".join(lines)
