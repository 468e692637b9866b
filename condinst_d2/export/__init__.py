"""Export of a whole CondInst model (image -> final detections) to one ONNX file."""

from .onnx_export import (
    METADATA_MARKER,
    OnnxExportError,
    check_exportable,
    config_metadata,
    export_onnx,
)

__all__ = [
    "METADATA_MARKER",
    "OnnxExportError",
    "check_exportable",
    "config_metadata",
    "export_onnx",
]
