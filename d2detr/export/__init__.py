"""TorchScript and ``torch.export`` for every DETRBase detector (see :mod:`.api`)."""
from .api import (
    METADATA_FILE,
    check_native_op,
    export_torch_export,
    export_torchscript,
    load_exported,
    read_metadata,
)
from .wrapper import ExportableDetector

__all__ = [
    "ExportableDetector",
    "METADATA_FILE",
    "check_native_op",
    "export_torch_export",
    "export_torchscript",
    "load_exported",
    "read_metadata",
]
