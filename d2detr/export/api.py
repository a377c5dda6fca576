"""Export any DETRBase detector to TorchScript (tracing, or scripting where the model allows)
or ``torch.export`` (``.pt2``), as :class:`~d2detr.export.wrapper.ExportableDetector`.

The files need only ``torch`` and the ``d2detr._C`` operator library to run (see
:func:`get_library_path`)::

    import torch
    torch.ops.load_library(".../d2detr/_C....so")      # the deformable attention op
    model = torch.jit.load("model.ts")                  # or torch.export.load("model.pt2").module()
    boxes, scores, classes = model(image_uint8_chw)     # any H, W

Each file carries ``d2detr.json`` (class names, input format, detections per image) as an
extra file, so a user without d2detr still knows what the classes are.
"""
import json
import warnings
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from d2detr.layers.ms_deform_attn import (
    MultiScaleDeformableAttention,
    get_library_path,
    native_ms_deform_attn_available,
)

from .wrapper import ExportableDetector

__all__ = [
    "METADATA_FILE",
    "export_torchscript",
    "export_torch_export",
    "load_exported",
    "read_metadata",
    "check_native_op",
]

METADATA_FILE = "d2detr.json"


def check_native_op(model: nn.Module) -> None:
    """Raises if ``model`` uses deformable attention but the native op is not loaded: the
    pure-PyTorch fallback reads level sizes with ``.tolist()`` and would freeze them into the
    graph (wrong for other image sizes), and an exported file must call the registered op."""
    if any(isinstance(m, MultiScaleDeformableAttention) for m in model.modules()):
        if not native_ms_deform_attn_available("cpu"):
            raise RuntimeError(
                "exporting a model with deformable attention needs the native d2detr._C operator; "
                "build it with `python setup.py build_ext --inplace` (or `make install`)"
            )


def _metadata(model: nn.Module, class_names: Optional[Sequence[str]], fmt: str) -> Dict:
    return {
        "format": fmt,
        "model": type(model).__name__,
        "input": "image tensor [3, H, W], uint8 or float in 0-255, any H and W",
        "input_format": getattr(model, "input_format", "RGB"),
        "outputs": ["boxes [K, 4] XYXY pixels", "scores [K]", "classes [K] int64"],
        "detections_per_image": int(getattr(model, "select_box_nums_for_evaluation", 0)),
        "num_classes": int(getattr(model, "num_classes", 0)),
        "class_names": list(class_names) if class_names is not None else None,
        "needs_library": "d2detr._C (torch.ops.load_library) for d2detr::ms_deform_attn",
    }


def _wrap(model: nn.Module) -> ExportableDetector:
    check_native_op(model)
    return ExportableDetector(model).eval()


def export_torchscript(
    model: nn.Module,
    sample_image: Tensor,
    path: str,
    method: str = "trace",
    class_names: Optional[Sequence[str]] = None,
) -> torch.jit.ScriptModule:
    """Saves ``ExportableDetector(model)`` as TorchScript to ``path`` and returns it.

    ``method="trace"`` traces on ``sample_image`` (every size computation in the graph is a
    tensor op, so the trace holds for other sizes; the tracer's warnings about Python booleans
    concern checks on static dimensions and are silenced). ``method="script"`` compiles the
    Python source instead; it raises (with TorchScript's message) for models whose code is not
    scriptable."""
    wrapper = _wrap(model)
    if method == "trace":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)  # jit deprecation notice
            exported = torch.jit.trace(wrapper, (sample_image,), check_trace=False)
    elif method == "script":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            try:
                exported = torch.jit.script(wrapper)
            except Exception as e:  # TorchScript's frontend raises many types
                lines = [line.strip() for line in str(e).splitlines() if line.strip()]
                raise RuntimeError(
                    f"{type(model).__name__} cannot be scripted ({type(e).__name__}: {' / '.join(lines[:3])}); "
                    "use method='trace' (or torch.export)"
                ) from e
    else:
        raise ValueError(f"method must be 'trace' or 'script', got {method!r}")
    extra = {METADATA_FILE: json.dumps(_metadata(model, class_names, f"torchscript-{method}"))}
    torch.jit.save(exported, path, _extra_files=extra)
    return exported


def export_torch_export(
    model: nn.Module,
    sample_image: Tensor,
    path: str,
    min_size: int = 64,
    max_size: int = 4096,
    class_names: Optional[Sequence[str]] = None,
) -> "torch.export.ExportedProgram":
    """``torch.export`` of ``ExportableDetector(model)`` with dynamic height and width in
    ``[min_size, max_size]``, saved to ``path`` (``.pt2``); returns the ExportedProgram."""
    from torch.export import Dim

    wrapper = _wrap(model)
    h, w = int(sample_image.shape[-2]), int(sample_image.shape[-1])
    if not (min_size <= h <= max_size and min_size <= w <= max_size):
        raise ValueError(f"sample image {h}x{w} is outside the exported size range [{min_size}, {max_size}]")
    dynamic = {"image": {1: Dim("height", min=min_size, max=max_size), 2: Dim("width", min=min_size, max=max_size)}}
    with torch.no_grad():
        program = torch.export.export(wrapper, (sample_image,), dynamic_shapes=dynamic)
    extra = {METADATA_FILE: json.dumps(_metadata(model, class_names, "torch_export"))}
    torch.export.save(program, path, extra_files=extra)
    return program


def read_metadata(path: str) -> Dict:
    """The ``d2detr.json`` stored in an exported ``.ts`` / ``.pt2`` / ``.onnx`` file."""
    if path.endswith(".onnx"):
        from .onnx import read_onnx_metadata

        return read_onnx_metadata(path)
    extra = {METADATA_FILE: ""}
    if path.endswith(".pt2"):
        torch.export.load(path, extra_files=extra)
    else:
        torch.jit.load(path, _extra_files=extra, map_location="cpu")
    return json.loads(extra[METADATA_FILE])


def load_exported(path: str):
    """Loads a ``.ts`` / ``.pt2`` file written here (on the device it was exported on) as a
    callable ``image -> (boxes, scores, classes)``, loading the op library first (the same two
    lines work without d2detr)."""
    lib = get_library_path()
    if lib is not None and not native_ms_deform_attn_available("cpu"):
        torch.ops.load_library(lib)
    if path.endswith(".pt2"):
        return torch.export.load(path).module()
    return torch.jit.load(path)
