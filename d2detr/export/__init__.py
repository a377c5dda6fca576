"""TorchScript, ``torch.export`` (see :mod:`.api`) and ONNX (see :mod:`.onnx`) for every DETRBase detector."""
from .api import (
    METADATA_FILE,
    check_native_op,
    export_torch_export,
    export_torchscript,
    load_exported,
    read_metadata,
)
from .onnx import export_onnx
from .wrapper import ExportableDetector

__all__ = [
    "ExportableDetector",
    "METADATA_FILE",
    "check_native_op",
    "export_onnx",
    "export_torch_export",
    "export_torchscript",
    "load_exported",
    "read_metadata",
]
