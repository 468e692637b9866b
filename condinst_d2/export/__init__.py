"""Export of a whole CondInst model (image -> final detections) to one ONNX file."""

from . import onnx_export
from .onnx_export import *  # noqa: F403  (the API: see onnx_export.__all__)

__all__ = onnx_export.__all__
