"""ONNX export of any DETRBase detector, as :class:`~d2detr.export.wrapper.ExportableDetector`
(one image ``[3, H, W]`` of any size in; boxes, scores, classes out), with ``torch.onnx.export``'s
dynamo exporter and dynamic height and width.

``d2detr::ms_deform_attn`` is lowered in one of two ways (``deform_attn=``):

* ``"grid_sample"`` (default): a decomposition into standard ONNX operators -- per level a
  ``Slice`` of the value, a ``Reshape`` to ``[N*M, D, H_l, W_l]`` (``H_l``, ``W_l`` read from
  ``spatial_shapes`` at run time, so every image size works), ``GridSample`` (opset 16: bilinear,
  zeros padding, ``align_corners=0``) at ``2 * loc - 1``, then the attention-weighted sum. Plain
  ``onnxruntime`` runs the file; no custom-op library.
* ``"tensorrt"``: one node ``trt::MultiscaleDeformableAttnPlugin_TRT`` with the five inputs of
  NVIDIA TensorRT's plugin (value ``[N, S, M, D]``, spatial shapes ``[L, 2]`` int32, level start
  index ``[L]`` int32, sampling locations ``[N, Q, M, L, P, 2]``, attention weights ``[N, Q, M, L,
  P]``), output ``[N, Q, M, D]`` (reshaped to ``[N, Q, M*D]`` after it), attribute
  ``plugin_version="1"``. TensorRT's ONNX parser maps an unknown node to the registered plugin of
  the same name (``libnvinfer_plugin``); onnxruntime cannot run such a file.

Usage (needs ``onnx`` and ``onnxscript`` to export, only ``onnxruntime`` and ``numpy`` to run)::

    from d2detr.export.onnx import export_onnx
    export_onnx(model, sample_image, "model.onnx", class_names=["tree"])

    import numpy as np, onnxruntime as ort
    session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
    boxes, scores, classes = session.run(None, {"image": image_chw_uint8})
"""
import json
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from .api import METADATA_FILE, _metadata, _size_dims, _wrap, dynamic_size_range

__all__ = [
    "DEFORM_ATTN_LOWERINGS",
    "OPSET",
    "TRT_PLUGIN",
    "export_onnx",
    "load_onnx",
    "ms_deform_attn_grid_sample",
    "ms_deform_attn_tensorrt",
    "read_onnx_metadata",
]

#: Default ONNX opset of the files (``GridSample`` needs >= 16; the dynamo exporter's
#: operator library is written against 18).
OPSET = 18
#: The TensorRT plugin the ``"tensorrt"`` lowering calls: (domain, op_type, plugin_version).
TRT_PLUGIN = ("trt", "MultiscaleDeformableAttnPlugin_TRT", "1")


def _op():
    from onnxscript import opset18

    return opset18


def _ints(*values: int):
    return _op().Constant(value_ints=list(values))


def ms_deform_attn_grid_sample(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """ONNX lowering of ``d2detr::ms_deform_attn`` with standard operators only (called by the
    dynamo exporter with ONNX values). Same semantics as
    :func:`~d2detr.layers.ms_deform_attn.ms_deform_attn_reference`. The number of heads ``M``,
    channels ``D``, levels ``L`` and points ``P`` are static in every d2detr model (they are read
    from the values' shapes); batch, tokens ``S``, queries ``Q`` and the level sizes are dynamic."""
    op = _op()
    _, _, M, D = value.shape
    L, P = sampling_locations.shape[3], sampling_locations.shape[4]
    for name, n in (("heads", M), ("channels per head", D), ("levels", L), ("points", P)):
        if not isinstance(n, int):
            raise ValueError(f"ONNX lowering of ms_deform_attn needs a static number of {name}, got {n}")
    shape_v = op.Shape(value)
    n = op.Slice(shape_v, _ints(0), _ints(1))  # [1] batch
    nm = op.Mul(n, _ints(M))
    # [N, S, M, D] -> [N, M, D, S] -> [N*M, D, S]
    value_t = op.Reshape(op.Transpose(value, perm=[0, 2, 3, 1]), op.Concat(nm, _ints(D, -1), axis=0))
    # [N, Q, M, L, P, 2] in [0, 1] -> [N, M, Q, L, P, 2] in [-1, 1] -> [N*M, Q, L, P, 2]
    grids = op.Sub(op.Add(sampling_locations, sampling_locations), op.CastLike(1.0, sampling_locations))
    grids = op.Reshape(op.Transpose(grids, perm=[0, 2, 1, 3, 4, 5]), op.Concat(nm, _ints(-1, L, P, 2), axis=0))
    # [N, Q, M, L, P] -> [N, M, Q, L, P] -> [N*M, 1, Q, L, P]
    weights = op.Reshape(
        op.Transpose(attention_weights, perm=[0, 2, 1, 3, 4]), op.Concat(nm, _ints(1, -1, L, P), axis=0)
    )
    output = None
    for level in range(L):
        hw = op.Gather(spatial_shapes, _ints(level), axis=0)  # [1, 2] (H, W)
        hw = op.Reshape(hw, _ints(2))
        start = op.Gather(level_start_index, _ints(level), axis=0)  # [1]
        end = op.Add(start, op.ReduceProd(hw, keepdims=1))
        value_l = op.Slice(value_t, start, end, _ints(2))  # [N*M, D, H*W]
        value_l = op.Reshape(value_l, op.Concat(nm, _ints(D), hw, axis=0))  # [N*M, D, H, W]
        grid_l = op.Squeeze(op.Gather(grids, _ints(level), axis=2), _ints(2))  # [N*M, Q, P, 2]
        sampled = op.GridSample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=0)
        weight_l = op.Squeeze(op.Gather(weights, _ints(level), axis=3), _ints(3))  # [N*M, 1, Q, P]
        term = op.ReduceSum(op.Mul(sampled, weight_l), _ints(3), keepdims=0)  # [N*M, D, Q]
        output = term if output is None else op.Add(output, term)
    # [N*M, D, Q] -> [N, M*D, Q] -> [N, Q, M*D]
    output = op.Reshape(output, op.Concat(n, _ints(M * D, -1), axis=0))
    return op.Transpose(output, perm=[0, 2, 1])


_TRT_SCHEMA = None


def _trt_op():
    """An onnxscript op for the TensorRT plugin node (an OpSchema built here, so the exporter's
    graph builder accepts a node that no ONNX domain defines)."""
    global _TRT_SCHEMA
    import onnx
    from onnxscript.values import Op, Opset

    domain, name, _ = TRT_PLUGIN
    if _TRT_SCHEMA is None:
        param = onnx.defs.OpSchema.FormalParameter
        _TRT_SCHEMA = onnx.defs.OpSchema(
            name,
            domain,
            1,
            "NVIDIA TensorRT MultiscaleDeformableAttnPlugin_TRT (libnvinfer_plugin)",
            inputs=[
                param("value", "T"),
                param("spatial_shapes", "I"),
                param("level_start_index", "I"),
                param("sampling_locations", "T"),
                param("attention_weights", "T"),
            ],
            outputs=[param("output", "T")],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("I", ["tensor(int32)"], "")],
            attributes=[onnx.defs.OpSchema.Attribute("plugin_version", onnx.defs.OpSchema.AttrType.STRING, "")],
        )
    return Op(Opset(domain, 1), name, _TRT_SCHEMA)


def ms_deform_attn_tensorrt(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """ONNX lowering of ``d2detr::ms_deform_attn`` to one TensorRT plugin node (see the module
    docstring); the plugin wants int32 shapes and returns ``[N, Q, M, D]``."""
    op = _op()
    _, _, M, D = value.shape
    out = _trt_op()(
        value,
        op.Cast(spatial_shapes, to=6),  # INT32
        op.Cast(level_start_index, to=6),
        sampling_locations,
        attention_weights,
        plugin_version=TRT_PLUGIN[2],
    )
    nq = op.Slice(op.Shape(sampling_locations), _ints(0), _ints(2))
    return op.Reshape(out, op.Concat(nq, _ints(M * D), axis=0))


DEFORM_ATTN_LOWERINGS = {"grid_sample": ms_deform_attn_grid_sample, "tensorrt": ms_deform_attn_tensorrt}


def export_onnx(
    model: nn.Module,
    sample_image: Tensor,
    path: str,
    deform_attn: str = "grid_sample",
    opset: int = OPSET,
    min_size: Optional[int] = None,
    max_size: int = 4096,
    class_names: Optional[Sequence[str]] = None,
):
    """Exports ``ExportableDetector(model)`` to ONNX at ``path`` with the dynamo exporter:
    input ``image`` ``[3, height, width]`` (dynamic, in ``[min_size, max_size]``; ``min_size=None``:
    the smallest the model allows, see :func:`~d2detr.export.api.dynamic_size_range`), outputs
    ``boxes``, ``scores``, ``classes``; the ``d2detr.json`` metadata (class names, input format,
    ...) in the model's ``metadata_props``. ``deform_attn`` picks the lowering of the deformable
    attention op (see the module docstring). Returns the ``torch.onnx.ONNXProgram``."""
    if deform_attn not in DEFORM_ATTN_LOWERINGS:
        raise ValueError(f"deform_attn must be one of {sorted(DEFORM_ATTN_LOWERINGS)}, got {deform_attn!r}")
    if opset < 16:
        raise ValueError(f"opset must be >= 16 (GridSample), got {opset}")
    wrapper = _wrap(model)
    min_size, max_size = dynamic_size_range(model, sample_image, min_size, max_size)
    dynamic = _size_dims(min_size, max_size)
    table = {torch.ops.d2detr.ms_deform_attn.default: DEFORM_ATTN_LOWERINGS[deform_attn]}
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            (sample_image,),
            dynamo=True,
            input_names=["image"],
            output_names=["boxes", "scores", "classes"],
            dynamic_shapes=dynamic,
            opset_version=opset,
            custom_translation_table=table,
            optimize=True,
            verbose=False,
        )
    meta = _metadata(model, class_names, f"onnx-{deform_attn}")
    meta["min_size"], meta["max_size"] = min_size, max_size
    # An ONNX input has one element type: that of the sample (uint8 from the tool).
    meta["input"] = f"image {str(sample_image.dtype).replace('torch.', '')} [3, H, W] (0-255), any H and W"
    meta["needs_library"] = (
        "nothing: standard ONNX operators" if deform_attn == "grid_sample"
        else "TensorRT's libnvinfer_plugin (MultiscaleDeformableAttnPlugin_TRT)"
    )
    program.model.metadata_props[METADATA_FILE] = json.dumps(meta)
    program.save(path, external_data=False)
    return program


def load_onnx(path: str, threads: Optional[int] = None, providers: Sequence[str] = ("CPUExecutionProvider",)):
    """An onnxruntime session of ``path`` as a callable ``image [3, H, W] tensor -> (boxes, scores,
    classes)`` tensors, like :func:`~d2detr.export.api.load_exported` for the other formats.
    ``threads`` sets ``intra_op_num_threads`` (default: onnxruntime's)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(path, options, providers=list(providers))

    def run(image: Tensor):
        outputs = session.run(None, {"image": image.detach().cpu().contiguous().numpy()})
        return tuple(torch.from_numpy(x) for x in outputs)

    run.session = session
    return run


def read_onnx_metadata(path: str) -> Dict:
    """The ``d2detr.json`` metadata stored in an ONNX file written by :func:`export_onnx`."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == METADATA_FILE:
            return json.loads(prop.value)
    raise KeyError(f"{path} has no {METADATA_FILE} metadata (not written by d2detr.export.export_onnx)")
