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
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from d2detr.layers.ms_deform_attn import (
    MultiScaleDeformableAttention,
    get_library_path,
    native_ms_deform_attn_available,
)

from .wrapper import ExportableDetector, feature_strides, min_image_size

__all__ = [
    "METADATA_FILE",
    "export_torchscript",
    "export_torch_export",
    "load_exported",
    "read_metadata",
    "check_native_op",
    "dynamic_size_range",
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


def dynamic_size_range(model: nn.Module, sample_image: Tensor, min_size: Optional[int] = None,
                       max_size: int = 4096) -> Tuple[int, int]:
    """``(min_size, max_size)`` of the dynamic height and width of an exported graph, checked
    against the model and the sample image. ``min_size=None``: the model's smallest,
    :func:`~d2detr.export.wrapper.min_image_size` (1 + its largest feature stride); a smaller
    value is refused here with the reason, rather than by ``torch.export``'s constraint solver."""
    needed = min_image_size(model)
    if min_size is None:
        min_size = needed
    elif min_size < needed:
        raise ValueError(
            f"min_size {min_size} cannot work for {type(model).__name__}: its coarsest feature map has stride "
            f"{max(feature_strides(model))}, and a dynamic height/width needs it at least 2 cells wide "
            f"(torch.export specialises sizes 1), so images must be at least {needed} pixels; "
            f"use min_size >= {needed} (--min-size {needed}), or leave it unset"
        )
    if max_size < min_size:
        raise ValueError(f"max_size {max_size} is smaller than min_size {min_size}")
    h, w = int(sample_image.shape[-2]), int(sample_image.shape[-1])
    if not (min_size <= h <= max_size and min_size <= w <= max_size):
        raise ValueError(
            f"sample image {h}x{w} is outside the exported size range [{min_size}, {max_size}]; "
            "give a sample image inside it"
        )
    return min_size, max_size


def _size_dims(min_size: int, max_size: int) -> Dict:
    from torch.export import Dim

    return {"image": {1: Dim("height", min=min_size, max=max_size), 2: Dim("width", min=min_size, max=max_size)}}


def _explain_constraint_violation(e: Exception, model: nn.Module, min_size: int, max_size: int) -> None:
    """torch.export's ``Constraints violated`` -> a ``ValueError`` saying what to change."""
    text = str(e)
    if "Constraints violated" in text:
        suggested = [line.strip() for line in text.splitlines() if "Dim(" in line]
        raise ValueError(
            f"{type(model).__name__} cannot be exported for every height/width in [{min_size}, {max_size}]: "
            f"torch.export needs {'; '.join(suggested) or 'another range'} (its message: "
            f"{text.splitlines()[1].strip() if len(text.splitlines()) > 1 else text}); "
            "pass --min-size/--max-size inside that range"
        ) from e


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
    min_size: Optional[int] = None,
    max_size: int = 4096,
    class_names: Optional[Sequence[str]] = None,
) -> "torch.export.ExportedProgram":
    """``torch.export`` of ``ExportableDetector(model)`` with dynamic height and width in
    ``[min_size, max_size]`` (``min_size=None``: the smallest the model allows, see
    :func:`dynamic_size_range`), saved to ``path`` (``.pt2``); returns the ExportedProgram.
    The program rejects, at run time, inputs that are not ``[3, H, W]`` or whose size is outside
    the range (torch.export's input guards)."""
    wrapper = _wrap(model)
    min_size, max_size = dynamic_size_range(model, sample_image, min_size, max_size)
    with torch.no_grad():
        try:
            program = torch.export.export(wrapper, (sample_image,), dynamic_shapes=_size_dims(min_size, max_size))
        except Exception as e:  # torch._dynamo.exc.UserError and friends
            _explain_constraint_violation(e, model, min_size, max_size)
            raise
    meta = _metadata(model, class_names, "torch_export")
    meta["min_size"], meta["max_size"] = min_size, max_size
    extra = {METADATA_FILE: json.dumps(meta)}
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
